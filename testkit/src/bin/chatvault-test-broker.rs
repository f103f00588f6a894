//! A Kafka-protocol broker in its own process, for tests that need Kafka to outlive (or be restarted
//! independently of) the processes under test: librdkafka's mock cluster, which lives inside the client that
//! created it and therefore dies with whichever process hosts it.
//!
//! ```text
//! chatvault-test-broker --topic NAME [--partitions N] [--brokers N]
//! ```
//!
//! Creates `NAME` with `N` partitions (12 by default), its audit topic `NAME.audit` and its dead-letter topic `NAME.dead-letter` (one
//! partition) on a cluster of `--brokers` brokers (3), replicated on all of them, then prints one line
//! `bootstrap <host:port,...>` on stdout. It then reads commands on stdin, one per line, and answers each with
//! one line, `ok <command>` or `error <command>: <reason>`:
//!
//! - `broker_down [ID]`: broker `ID` (all brokers without `ID`) drops its connections and refuses new ones;
//!   the data it holds stays (librdkafka's `rd_kafka_mock_broker_set_down`);
//! - `broker_up [ID]`: accepts connections again;
//! - `quit`: exits.
//!
//! It exits when stdin closes, so a test that dies takes its broker with it. The mock keeps about 5 MB or
//! 100,000 records per partition and deletes older records (its log-start offset then moves).

use std::io::{BufRead, Write};

use anyhow::Context;
use rdkafka::mocking::MockCluster;

struct Arguments {
    topic: String,
    partitions: i32,
    brokers: i32,
}

fn arguments() -> anyhow::Result<Arguments> {
    let mut topic = None;
    let mut partitions = 12;
    let mut brokers = 3;
    let mut args = std::env::args().skip(1);
    while let Some(name) = args.next() {
        let mut value = || args.next().with_context(|| format!("{name} needs a value"));
        match name.as_str() {
            "--topic" => topic = Some(value()?),
            "--partitions" => partitions = value()?.parse().context("--partitions")?,
            "--brokers" => brokers = value()?.parse().context("--brokers")?,
            other => anyhow::bail!(
                "unknown argument {other:?} (usage: --topic NAME [--partitions N] [--brokers N])"
            ),
        }
    }
    anyhow::ensure!(partitions > 0, "--partitions must be positive");
    anyhow::ensure!(brokers > 0, "--brokers must be positive");
    Ok(Arguments {
        topic: topic.context("--topic is required")?,
        partitions,
        brokers,
    })
}

/// The broker id a command names: `-1` (all brokers, as librdkafka spells it) without one.
fn broker_id(argument: Option<&str>) -> anyhow::Result<i32> {
    match argument {
        None => Ok(-1),
        Some(id) => id.parse().with_context(|| format!("broker id {id:?}")),
    }
}

fn main() -> anyhow::Result<()> {
    let arguments = arguments()?;
    let cluster = MockCluster::new(arguments.brokers).context("creating the mock cluster")?;
    cluster
        .create_topic(&arguments.topic, arguments.partitions, arguments.brokers)
        .with_context(|| format!("creating topic {}", arguments.topic))?;
    let dead_letter = format!("{}.dead-letter", arguments.topic);
    cluster
        .create_topic(&dead_letter, 1, arguments.brokers)
        .with_context(|| format!("creating topic {dead_letter}"))?;
    let audit = format!("{}.audit", arguments.topic);
    cluster
        .create_topic(&audit, 1, arguments.brokers)
        .with_context(|| format!("creating topic {audit}"))?;

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "bootstrap {}", cluster.bootstrap_servers())?;
    stdout.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading stdin")?;
        let mut words = line.split_whitespace();
        let Some(command) = words.next() else {
            continue;
        };
        let result = match command {
            "broker_down" => broker_id(words.next())
                .and_then(|id| cluster.broker_down(id).map_err(anyhow::Error::from)),
            "broker_up" => broker_id(words.next())
                .and_then(|id| cluster.broker_up(id).map_err(anyhow::Error::from)),
            "quit" => {
                writeln!(stdout, "ok quit")?;
                stdout.flush()?;
                return Ok(());
            }
            other => Err(anyhow::anyhow!("unknown command {other:?}")),
        };
        match result {
            Ok(()) => writeln!(stdout, "ok {line}")?,
            Err(error) => writeln!(stdout, "error {line}: {error:#}")?,
        }
        stdout.flush()?;
    }
    Ok(())
}
