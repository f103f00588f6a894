//! The `chatvault` binary as child processes: a role started from a configuration file, signalled like
//! Kubernetes does (SIGTERM), and timed until it exits.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use chatvault_config::Config;
use tonic_health::pb::HealthCheckRequest;
pub use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Log levels for child roles: shutdown steps are logged at info.
pub const CHILD_LOG: &str = "warn,chatvault=info,chatvault_ingest_gateway=info,chatvault_archiver=info,chatvault_restorer=info";

/// A free loopback port for a child process to listen on.
///
/// Ports come from below Linux's ephemeral range (32768-60999): a port taken from inside it (by binding port 0)
/// can be handed to some outgoing connection (a gRPC client, librdkafka) before the child binds it, which once
/// failed CI with "Address already in use". Below the range only explicit binds compete: each candidate is
/// checked by binding it, and no port is handed out twice by this process.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    // Start at a per-process offset so test binaries running one after another do not all probe the same ports.
    let start = std::process::id().wrapping_mul(7_919) % COUNT;
    for _ in 0..COUNT {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + step) % COUNT) as u16;
        let mut handed_out = HANDED_OUT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if handed_out.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return Ok(port);
        }
    }
    anyhow::bail!(
        "no free loopback port between {FIRST} and {}",
        FIRST + COUNT
    )
}

/// `127.0.0.1:<free port>`.
pub fn free_address() -> anyhow::Result<String> {
    Ok(format!("127.0.0.1:{}", free_port()?))
}

/// Writes `config` as a TOML configuration file at `path`.
pub fn write_config(config: &Config, path: &Path) -> anyhow::Result<()> {
    let text = toml::to_string(config).context("serializing the configuration")?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Waits up to `timeout` for `child` to exit; `None` if it is still running.
pub async fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `chatvault` child process, killed when dropped (a failed test leaves nothing running).
pub struct ChildRole {
    pub name: String,
    child: Child,
}

impl ChildRole {
    /// Starts `binary` with `args` (for example `["archiver", "-c", path]`); stderr goes to the test's output.
    pub fn spawn(name: &str, binary: &Path, args: &[&str]) -> anyhow::Result<ChildRole> {
        ChildRole::spawn_with_env(name, binary, args, &[])
    }

    /// [`ChildRole::spawn`] with extra environment variables (for example [`crate::moto::CREDENTIAL_ENV`]).
    pub fn spawn_with_env(
        name: &str,
        binary: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<ChildRole> {
        let child = Command::new(binary)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", CHILD_LOG)
            .env_remove("CHATVAULT_CRASH_AT")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(ChildRole {
            name: name.to_string(),
            child,
        })
    }

    /// `binary <role> -c <config_path>`.
    pub fn spawn_role(
        name: &str,
        binary: &Path,
        role: &str,
        config_path: &Path,
    ) -> anyhow::Result<ChildRole> {
        let path = config_path.to_string_lossy();
        ChildRole::spawn(name, binary, &[role, "-c", path.as_ref()])
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM, as Kubernetes does at the start of a pod's termination.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM {} failed", self.child.id());
        Ok(())
    }

    /// The exit status if the process has exited.
    pub fn try_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub async fn wait_for_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_for_exit(&mut self.child, timeout).await
    }

    /// SIGTERM, then waits up to `deadline`: the exit status and how long the shutdown took. Fails when the
    /// process is still running at the deadline (it is then killed).
    pub async fn terminate_and_wait(
        &mut self,
        deadline: Duration,
    ) -> anyhow::Result<(ExitStatus, Duration)> {
        let started = Instant::now();
        self.terminate()?;
        match self.wait_for_exit(deadline).await {
            Some(status) => Ok((status, started.elapsed())),
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                anyhow::bail!("{} did not exit within {deadline:?} of SIGTERM", self.name)
            }
        }
    }

    /// SIGKILL (a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildRole {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The status `grpc.health.v1.Health/Check` reports for `service` (`""`: the server) at `endpoint`
/// (`http://host:port`), with a short deadline.
pub async fn health_status(endpoint: &str, service: &str) -> anyhow::Result<ServingStatus> {
    let channel = tonic::transport::Channel::from_shared(endpoint.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// Waits until `service` at `endpoint` reports SERVING; fails after `timeout`.
pub async fn wait_until_serving(
    endpoint: &str,
    service: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match health_status(endpoint, service).await {
            Ok(ServingStatus::Serving) => return Ok(()),
            other if Instant::now() >= deadline => {
                anyhow::bail!("{endpoint} is not SERVING {service:?} after {timeout:?}: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
