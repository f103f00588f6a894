//! Object stores from URLs. Everything chatvault persists goes through `object_store::ObjectStore`, so the
//! same code runs on a local directory, S3 (or any S3-compatible server), and in memory in tests.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::prefix::PrefixStore;

use crate::config::{LockMode, StorageConfig};
use crate::error::{Error, Result};
use crate::object_lock::{LockingS3, S3Settings};

/// Installs ring as rustls' process-wide crypto provider (one crypto library for TLS and for the archive's
/// encryption). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds the store named by `storage.url`:
/// - `file:///abs/path` or `file://./relative/path`: a local directory, created when missing;
/// - `s3://bucket[/prefix]`: S3 or a compatible server; `storage.options` and the `AWS_*` environment
///   configure endpoint, region and credentials; with `storage.object_lock` on, the store writes S3
///   Object Lock headers and deletes every version ([`LockingS3`]);
/// - `memory://`: in memory, for tests.
pub fn object_store_from_config(storage: &StorageConfig) -> Result<Arc<dyn ObjectStore>> {
    if let Some(locking) = locking_store_from_config(storage)? {
        return Ok(locking);
    }
    plain_store(storage)
}

/// The Object Lock store of `storage` (`None` when `storage.object_lock` is off), for the callers that
/// read or change locks themselves (`chatvault doctor`, disposition). Errors when Object Lock is asked of
/// storage that is not S3.
pub fn locking_store_from_config(storage: &StorageConfig) -> Result<Option<Arc<LockingS3>>> {
    if storage.object_lock == LockMode::Off {
        return Ok(None);
    }
    let Some((bucket, prefix)) = s3_bucket_and_prefix(&storage.url)? else {
        return Err(Error::invalid_argument(
            "storage.object_lock: Object Lock is an S3 feature; storage.url must be s3://",
        ));
    };
    let option = |names: &[&str]| {
        names
            .iter()
            .find_map(|name| storage.options.get(*name))
            .cloned()
    };
    let settings = S3Settings {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        region: option(&["aws_region", "region"]),
        endpoint: option(&[
            "aws_endpoint",
            "endpoint",
            "aws_endpoint_url",
            "endpoint_url",
        ]),
        access_key_id: option(&["aws_access_key_id", "access_key_id"]),
        secret_access_key: option(&["aws_secret_access_key", "secret_access_key"]),
        virtual_hosted: option(&[
            "aws_virtual_hosted_style_request",
            "virtual_hosted_style_request",
        ])
        .is_some_and(|value| value == "true"),
    };
    Ok(Some(Arc::new(LockingS3::new(
        plain_store(storage)?,
        settings,
        storage.object_lock,
    ))))
}

/// `s3://bucket[/prefix]` as (bucket, prefix); `None` for other schemes.
fn s3_bucket_and_prefix(url: &str) -> Result<Option<(&str, &str)>> {
    let Some(rest) = url.strip_prefix("s3://") else {
        return Ok(None);
    };
    let (bucket, prefix) = match rest.split_once('/') {
        Some((bucket, prefix)) => (bucket, prefix.trim_matches('/')),
        None => (rest, ""),
    };
    if bucket.is_empty() {
        return Err(Error::invalid_argument(
            "storage.url: s3:// needs a bucket name",
        ));
    }
    Ok(Some((bucket, prefix)))
}

/// The `object_store` store of `storage.url`, without Object Lock.
fn plain_store(storage: &StorageConfig) -> Result<Arc<dyn ObjectStore>> {
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
    if let Some((bucket, prefix)) = s3_bucket_and_prefix(url)? {
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
