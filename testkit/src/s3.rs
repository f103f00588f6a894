//! An S3 server speaking the S3 wire protocol over loopback TCP, backed by a temporary directory (s3s-fs).
//! It supports conditional puts (`If-None-Match: *`), which the manifest commit relies on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chatvault_core::config::StorageConfig;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub const ACCESS_KEY: &str = "chatvault-test-access";
pub const SECRET_KEY: &str = "chatvault-test-secret";

pub struct S3Server {
    pub endpoint: String,
    pub bucket: String,
    root: TempDir,
    task: JoinHandle<()>,
}

impl S3Server {
    /// Starts a server with one empty bucket.
    pub async fn start(bucket: &str) -> anyhow::Result<S3Server> {
        let root = tempfile::tempdir()?;
        std::fs::create_dir_all(root.path().join(bucket))?;
        let filesystem = s3s_fs::FileSystem::new(root.path())
            .map_err(|error| anyhow::anyhow!("starting s3s-fs: {error:?}"))?;
        let mut builder = S3ServiceBuilder::new(filesystem);
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let connection = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
        });
        Ok(S3Server {
            endpoint,
            bucket: bucket.to_string(),
            root,
            task,
        })
    }

    /// `storage` settings pointing chatvault at this server over the S3 protocol.
    pub fn storage_config(&self) -> StorageConfig {
        StorageConfig {
            url: format!("s3://{}", self.bucket),
            options: BTreeMap::from([
                ("aws_endpoint".to_string(), self.endpoint.clone()),
                ("aws_allow_http".to_string(), "true".to_string()),
                ("aws_region".to_string(), "us-east-1".to_string()),
                ("aws_access_key_id".to_string(), ACCESS_KEY.to_string()),
                ("aws_secret_access_key".to_string(), SECRET_KEY.to_string()),
                (
                    "aws_virtual_hosted_style_request".to_string(),
                    "false".to_string(),
                ),
            ]),
        }
    }

    /// The directory holding the bucket's objects (object key = relative path), for readers that take files
    /// (DuckDB, pyarrow) and for tampering in tests.
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.path().join(&self.bucket)
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}
