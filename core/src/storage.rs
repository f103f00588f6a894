//! Object stores from URLs. Everything chatvault persists goes through `object_store::ObjectStore`, so the
//! same code runs on a local directory, S3 (or any S3-compatible server), and in memory in tests.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::prefix::PrefixStore;

use crate::config::StorageConfig;
use crate::error::{Error, Result};

/// Installs ring as rustls' process-wide crypto provider (one crypto library for TLS and for the archive's
/// encryption). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds the store named by `storage.url`:
/// - `file:///abs/path` or `file://./relative/path`: a local directory, created when missing;
/// - `s3://bucket[/prefix]`: S3 or a compatible server; `storage.options` and the `AWS_*` environment
///   configure endpoint, region and credentials;
/// - `memory://`: in memory, for tests.
pub fn object_store_from_config(storage: &StorageConfig) -> Result<Arc<dyn ObjectStore>> {
    install_crypto_provider();
    let url = storage.url.as_str();
    if let Some(path) = url.strip_prefix("file://") {
        std::fs::create_dir_all(path).map_err(|error| {
            Error::invalid_argument(format!("storage.url: creating {path}: {error}"))
        })?;
        let store = LocalFileSystem::new_with_prefix(path)
            .map_err(|error| Error::invalid_argument(format!("storage.url: {error}")))?;
        return Ok(Arc::new(store));
    }
    if url.starts_with("memory://") {
        return Ok(Arc::new(InMemory::new()));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = match rest.split_once('/') {
            Some((bucket, prefix)) => (bucket, prefix.trim_matches('/')),
            None => (rest, ""),
        };
        if bucket.is_empty() {
            return Err(Error::invalid_argument(
                "storage.url: s3:// needs a bucket name",
            ));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        for (key, value) in &storage.options {
            let config_key = key.parse().map_err(|_| {
                Error::invalid_argument(format!("storage.options.{key}: not an S3 option"))
            })?;
            builder = builder.with_config(config_key, value);
        }
        let store = builder
            .build()
            .map_err(|error| Error::invalid_argument(format!("storage: {error}")))?;
        if prefix.is_empty() {
            return Ok(Arc::new(store));
        }
        return Ok(Arc::new(PrefixStore::new(store, prefix)));
    }
    Err(Error::invalid_argument(
        "storage.url: must start with file://, s3:// or memory://",
    ))
}
