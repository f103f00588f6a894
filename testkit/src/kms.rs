//! AWS KMS for tests: moto's server mode (`moto_server` from the test virtualenv), which implements the KMS
//! API over HTTP: keys, aliases, GenerateDataKey, Decrypt and ReEncrypt with encryption contexts.
//!
//! What moto does not model: key states on cryptographic calls (a disabled key or one pending deletion still
//! decrypts), so tests cannot prove "the old key is no longer needed" by disabling it; they prove it by
//! decrypting with the new key's id named, which moto does enforce.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use chatvault_core::config::AwsKmsConfig;

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
/// loses every key, so outages are simulated by pausing it ([`MotoKms::pause`]).
pub struct MotoKms {
    child: Child,
    pub endpoint: String,
}

impl MotoKms {
    pub fn start() -> anyhow::Result<MotoKms> {
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
        let kms = MotoKms {
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
        Ok(kms)
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
    pub fn client(&self) -> aws_sdk_kms::Client {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let config = aws_sdk_kms::config::Builder::new()
            .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
            .region(aws_sdk_kms::config::Region::new(REGION))
            .endpoint_url(&self.endpoint)
            .credentials_provider(aws_sdk_kms::config::Credentials::new(
                "chatvault-test",
                "chatvault-test-secret",
                None,
                None,
                "chatvault-testkit",
            ))
            .http_client(http)
            .build();
        aws_sdk_kms::Client::from_conf(config)
    }

    /// A new symmetric encryption key; its ARN.
    pub async fn create_key(&self, description: &str) -> anyhow::Result<String> {
        let created = self
            .client()
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

impl Drop for MotoKms {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
