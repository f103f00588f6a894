//! A Kafka broker in its own process (`chatvault-test-broker`, librdkafka's mock cluster), so that the
//! processes under test can be killed and restarted around it and the broker itself can be "restarted"
//! (every broker down: connections drop, data stays; then up again). Or an external Kafka-compatible broker.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Name of the broker binary (`testkit/src/bin/chatvault-test-broker.rs`).
pub const BROKER_BINARY: &str = "chatvault-test-broker";

/// The `chatvault-test-broker` binary: `$CHATVAULT_TEST_BROKER_BIN` if set, else the one next to the running
/// test's target directory (`<target>/<profile>/chatvault-test-broker`, which a workspace build such as
/// `scripts/test.sh` produces). When it is missing (a build of one package only, for example
/// `cargo nextest run -p chatvault --test chaos`), it is built with `cargo build -p chatvault-testkit --bin
/// chatvault-test-broker` into that target directory first.
pub fn broker_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("CHATVAULT_TEST_BROKER_BIN") {
        return Ok(PathBuf::from(path));
    }
    // A test executable lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe().context("locating the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable is not under <target>/<profile>/deps")?;
    let binary = profile_dir.join(BROKER_BINARY);
    if binary.exists() {
        return Ok(binary);
    }
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_build = BUILD
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if binary.exists() {
        return Ok(binary);
    }
    let target_dir = profile_dir
        .parent()
        .context("no target directory above the profile directory")?;
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(other) => other.to_string(),
        None => anyhow::bail!("no profile directory name in {}", profile_dir.display()),
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    eprintln!(
        "{} is missing: building it (cargo build -p chatvault-testkit --bin {BROKER_BINARY} --profile {profile})",
        binary.display()
    );
    let status = Command::new(option_env!("CARGO").unwrap_or("cargo"))
        .args([
            "build",
            "--quiet",
            "-p",
            "chatvault-testkit",
            "--bin",
            BROKER_BINARY,
        ])
        .arg("--profile")
        .arg(&profile)
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .context("running cargo build for the test broker")?;
    anyhow::ensure!(
        status.success() && binary.exists(),
        "building {BROKER_BINARY} failed ({status}); build it with `cargo build -p chatvault-testkit --bin {BROKER_BINARY}` or set CHATVAULT_TEST_BROKER_BIN"
    );
    Ok(binary)
}

/// A `chatvault-test-broker` child process; killed when dropped.
pub struct BrokerProcess {
    /// `bootstrap.servers` of the cluster.
    pub brokers: String,
    child: Child,
    commands: Mutex<(ChildStdin, BufReader<ChildStdout>)>,
}

impl BrokerProcess {
    /// Starts a 3-broker mock cluster with `topic` (`partitions` partitions, replicated on every broker) and
    /// `<topic>.dead-letter` (one partition).
    pub fn start(topic: &str, partitions: i32) -> anyhow::Result<BrokerProcess> {
        BrokerProcess::start_binary(&broker_binary()?, topic, partitions)
    }

    /// [`BrokerProcess::start`] with the broker binary at `binary`.
    pub fn start_binary(
        binary: &Path,
        topic: &str,
        partitions: i32,
    ) -> anyhow::Result<BrokerProcess> {
        let mut child = Command::new(binary)
            .args(["--topic", topic, "--partitions", &partitions.to_string()])
            .args(["--brokers", "3"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdin = child.stdin.take().context("broker stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("broker stdout")?);
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .context("reading the broker's bootstrap line")?;
        let brokers = line
            .trim()
            .strip_prefix("bootstrap ")
            .with_context(|| {
                format!("the broker printed {line:?} instead of its bootstrap address")
            })?
            .to_string();
        Ok(BrokerProcess {
            brokers,
            child,
            commands: Mutex::new((stdin, stdout)),
        })
    }

    /// Sends one command (see the binary's documentation) and waits for its answer.
    pub fn command(&self, command: &str) -> anyhow::Result<()> {
        let mut guard = self
            .commands
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (stdin, stdout) = &mut *guard;
        writeln!(stdin, "{command}").context("writing to the broker")?;
        stdin.flush()?;
        let mut answer = String::new();
        stdout
            .read_line(&mut answer)
            .context("reading the broker's answer")?;
        let answer = answer.trim();
        anyhow::ensure!(
            answer == format!("ok {command}"),
            "broker command {command:?}: {answer:?}"
        );
        Ok(())
    }

    /// Every broker drops its connections and refuses new ones; the records stay.
    pub fn all_down(&self) -> anyhow::Result<()> {
        self.command("broker_down")
    }

    /// Every broker accepts connections again.
    pub fn all_up(&self) -> anyhow::Result<()> {
        self.command("broker_up")
    }

    /// Whether the broker process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates `topic` (`partitions` partitions), `<topic>.dead-letter` and `<topic>.audit` (one partition each)
/// on an external broker
/// through the Admin API, unless they exist. Replication factor 1 (enough for a test broker).
pub async fn ensure_topics(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let existing: Vec<String> = {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()?;
        consumer
            .fetch_metadata(None, Duration::from_secs(10))?
            .topics()
            .iter()
            .filter(|topic| topic.error().is_none() && !topic.partitions().is_empty())
            .map(|topic| topic.name().to_string())
            .collect()
    };
    let dead_letter = format!("{topic}.dead-letter");
    let mut wanted = Vec::new();
    if !existing.iter().any(|name| name == topic) {
        wanted.push(NewTopic::new(topic, partitions, TopicReplication::Fixed(1)));
    }
    if !existing.contains(&dead_letter) {
        wanted.push(NewTopic::new(&dead_letter, 1, TopicReplication::Fixed(1)));
    }
    let audit = format!("{topic}.audit");
    if !existing.contains(&audit) {
        wanted.push(NewTopic::new(&audit, 1, TopicReplication::Fixed(1)));
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let results = admin
        .create_topics(
            &wanted,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await?;
    for result in results {
        match result {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("creating topic {name}: {code}"),
        }
    }
    Ok(())
}
