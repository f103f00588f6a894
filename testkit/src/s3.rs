//! An S3 server speaking the S3 wire protocol over loopback TCP, backed by a temporary directory (s3s-fs).
//! It supports conditional puts (`If-None-Match: *`), which the manifest commit relies on.
//!
//! s3s-fs checks `If-None-Match` and then writes, which is not atomic: two racing conditional puts of the same
//! key can both succeed, where S3 lets exactly one win. `AtomicConditionalPuts` serializes conditional puts
//! so the server keeps S3's contract, which the exactly-once tests depend on.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use chatvault_core::config::StorageConfig;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub const ACCESS_KEY: &str = "chatvault-test-access";
pub const SECRET_KEY: &str = "chatvault-test-secret";

pub struct S3Server {
    pub endpoint: String,
    address: SocketAddr,
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
        let service = AtomicConditionalPuts {
            inner: builder.build(),
            lock: Arc::new(tokio::sync::Mutex::new(())),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let endpoint = format!("http://{address}");
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
            address,
            bucket: bucket.to_string(),
            root,
            task,
        })
    }

    /// `storage` settings pointing chatvault at this server over the S3 protocol.
    pub fn storage_config(&self) -> StorageConfig {
        self.storage_config_at(&self.endpoint)
    }

    /// [`S3Server::storage_config`] with another endpoint in front of this server (a proxy).
    pub fn storage_config_at(&self, endpoint: &str) -> StorageConfig {
        StorageConfig {
            url: format!("s3://{}", self.bucket),
            options: BTreeMap::from([
                ("aws_endpoint".to_string(), endpoint.to_string()),
                ("aws_allow_http".to_string(), "true".to_string()),
                ("aws_region".to_string(), "us-east-1".to_string()),
                ("aws_access_key_id".to_string(), ACCESS_KEY.to_string()),
                ("aws_secret_access_key".to_string(), SECRET_KEY.to_string()),
                (
                    "aws_virtual_hosted_style_request".to_string(),
                    "false".to_string(),
                ),
            ]),
            ..StorageConfig::default()
        }
    }

    /// The server's loopback address.
    pub fn address(&self) -> SocketAddr {
        self.address
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
        if std::env::var_os("CHATVAULT_TEST_KEEP_S3").is_some() {
            let kept = std::env::temp_dir().join(format!("chatvault-s3-{}", std::process::id()));
            let _ = std::fs::rename(self.root.path(), &kept);
            eprintln!("kept the test S3 server's files in {}", kept.display());
        }
    }
}

/// Runs conditional PUTs (`If-None-Match`) one at a time; everything else passes through concurrently.
#[derive(Clone)]
struct AtomicConditionalPuts {
    inner: S3Service,
    lock: Arc<tokio::sync::Mutex<()>>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<s3s::HttpResponse, s3s::HttpError>> + Send>>;

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for AtomicConditionalPuts {
    type Response = s3s::HttpResponse;
    type Error = s3s::HttpError;
    type Future = ResponseFuture;

    fn call(&self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
        let conditional = request.method() == http::Method::PUT
            && request.headers().contains_key(http::header::IF_NONE_MATCH);
        let inner = self.inner.clone();
        let lock = self.lock.clone();
        Box::pin(async move {
            if conditional {
                let _one_at_a_time = lock.lock().await;
                hyper::service::Service::call(&inner, request).await
            } else {
                hyper::service::Service::call(&inner, request).await
            }
        })
    }
}
