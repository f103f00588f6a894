//! AWS for tests: moto's server mode (`moto_server` from the test virtualenv), which implements over HTTP
//! - the KMS API: keys, aliases, GenerateDataKey, Decrypt and ReEncrypt with encryption contexts;
//! - the S3 API with versioning and Object Lock: retention dates and legal holds on versions, refused
//!   deletes of locked versions, conditional creates (`If-None-Match: *`).
//!
//! What moto does not model: GetObjectRetention (HeadObject reports the lock instead), refusing an earlier
//! date for a compliance-mode retention, GetBucketVersioning's documented root element; key states on cryptographic calls (a disabled key or one pending deletion still
//! decrypts), so tests cannot prove "the old key is no longer needed" by disabling it; they prove it by
//! decrypting with the new key's id named, which moto does enforce.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use chatvault_core::config::{AwsKmsConfig, LockMode, StorageConfig};

pub const REGION: &str = "us-east-1";

/// The environment under which a `chatvault` process finds static test credentials through the standard AWS
/// chain (moto accepts any), and looks for no instance metadata. Given to child processes only: the test
/// process's own environment is left alone.
pub const CREDENTIAL_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "chatvault-test"),
    ("AWS_SECRET_ACCESS_KEY", "chatvault-test-secret"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// A `moto_server` process on a free local port, killed when dropped. Its state is in memory: a restart
/// loses every key, so outages are simulated by pausing it ([`Moto::pause`]).
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> anyhow::Result<Moto> {
        let server = crate::python::venv_python().with_file_name("moto_server");
        anyhow::ensure!(
            server.exists(),
            "{} is missing: run scripts/setup-test-deps.sh (scripts/test.sh does) to install moto",
            server.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", server.display()))?;
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "moto_server did not listen on port {port} within 60s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(moto)
    }

    /// `keys.aws_kms` for this server, wrapping under `key_id`.
    pub fn config(&self, key_id: &str) -> AwsKmsConfig {
        AwsKmsConfig {
            region: REGION.into(),
            endpoint_url: self.endpoint.clone(),
            key_id: key_id.into(),
            timeout: Duration::from_secs(2),
            ..AwsKmsConfig::default()
        }
    }

    /// A KMS client for the test's own calls (creating keys), with static credentials.
    pub fn kms_client(&self) -> aws_sdk_kms::Client {
        let config = aws_sdk_kms::config::Builder::new()
            .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
            .region(aws_sdk_kms::config::Region::new(REGION))
            .endpoint_url(&self.endpoint)
            .credentials_provider(aws_sdk_kms::config::Credentials::new(
                CREDENTIAL_ENV[0].1,
                CREDENTIAL_ENV[1].1,
                None,
                None,
                "chatvault-testkit",
            ))
            .http_client(https_client())
            .build();
        aws_sdk_kms::Client::from_conf(config)
    }

    /// A new symmetric encryption key; its ARN.
    pub async fn create_key(&self, description: &str) -> anyhow::Result<String> {
        let created = self
            .kms_client()
            .create_key()
            .description(description)
            .send()
            .await
            .context("moto CreateKey")?;
        created
            .key_metadata()
            .and_then(|metadata| metadata.arn())
            .map(str::to_string)
            .context("moto CreateKey returned no ARN")
    }

    /// An S3 client for the test's own calls (making buckets, reading locks), with static credentials.
    pub fn s3_client(&self) -> aws_sdk_s3::Client {
        let config = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new(REGION))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                CREDENTIAL_ENV[0].1,
                CREDENTIAL_ENV[1].1,
                None,
                None,
                "chatvault-testkit",
            ))
            .http_client(https_client())
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// Creates `bucket` with Object Lock enabled (which also enables versioning), without a default
    /// retention: chatvault sets each object's lock itself.
    pub async fn create_locked_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        self.s3_client()
            .create_bucket()
            .bucket(bucket)
            .object_lock_enabled_for_bucket(true)
            .send()
            .await
            .with_context(|| format!("moto CreateBucket {bucket} with Object Lock"))?;
        Ok(())
    }

    /// Creates a plain bucket (no versioning, no Object Lock).
    pub async fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        self.s3_client()
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .with_context(|| format!("moto CreateBucket {bucket}"))?;
        Ok(())
    }

    /// `storage` for `bucket` on this server, with Object Lock `mode`.
    pub fn storage_config(&self, bucket: &str, mode: LockMode) -> StorageConfig {
        StorageConfig {
            url: format!("s3://{bucket}"),
            options: BTreeMap::from([
                ("aws_endpoint".to_string(), self.endpoint.clone()),
                ("aws_region".to_string(), REGION.to_string()),
                (
                    "aws_access_key_id".to_string(),
                    CREDENTIAL_ENV[0].1.to_string(),
                ),
                (
                    "aws_secret_access_key".to_string(),
                    CREDENTIAL_ENV[1].1.to_string(),
                ),
                ("aws_allow_http".to_string(), "true".to_string()),
                (
                    "aws_virtual_hosted_style_request".to_string(),
                    "false".to_string(),
                ),
            ]),
            object_lock: mode,
        }
    }

    /// Every version id of `key` in `bucket` (delete markers included).
    pub async fn versions(&self, bucket: &str, key: &str) -> anyhow::Result<Vec<String>> {
        let listed = self
            .s3_client()
            .list_object_versions()
            .bucket(bucket)
            .prefix(key)
            .send()
            .await
            .context("moto ListObjectVersions")?;
        let mut ids: Vec<String> = listed
            .versions()
            .iter()
            .filter(|version| version.key() == Some(key))
            .filter_map(|version| version.version_id().map(str::to_string))
            .collect();
        ids.extend(
            listed
                .delete_markers()
                .iter()
                .filter(|marker| marker.key() == Some(key))
                .filter_map(|marker| marker.version_id().map(str::to_string)),
        );
        Ok(ids)
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel but never answered, as with a
    /// KMS endpoint that hangs.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} moto_server failed");
        Ok(())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The AWS SDK's HTTP client on rustls with ring (the one TLS stack and crypto library of the project).
fn https_client() -> aws_sdk_s3::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}
