//! Back-fill throughput: a generated Slack export ZIP and a Mattermost bulk export imported through the
//! ingest gateway (librdkafka's mock cluster, in this process on loopback), every event counted once Kafka
//! acknowledged it. For comparison, the same process measures reading the exports alone (no gateway) and the
//! gateway's own `IngestBatch` rate with the same batch size.
//!
//! `cargo bench -p chatvault-benches --bench import_throughput` prints events/s; median of 3 runs each.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use chatvault_benches::{
    BenchGateway, INGEST_TOKEN, batch_run, machine, median, mock_cluster_config,
};
use chatvault_import::Source;
use chatvault_import::checkpoint::Checkpoint;
use chatvault_import::gateway::Gateway;
use chatvault_import::mattermost::MattermostExport;
use chatvault_import::slack_export::{Options, SlackExport};
use rdkafka::mocking::MockCluster;
use serde_json::json;

const RUNS: usize = 3;
const CHANNELS: usize = 10;
const DAYS: usize = 50;
const PER_DAY: usize = 200;
const BATCH: usize = 500;

/// ~300-byte messages of words, some threaded, some with reactions: `CHANNELS * DAYS * PER_DAY` of them.
fn slack_export(path: &Path) -> anyhow::Result<u64> {
    let mut writer = zip::ZipWriter::new(std::fs::File::create(path)?);
    let options = zip::write::SimpleFileOptions::default();
    writer.start_file("users.json", options)?;
    writer.write_all(
        br#"[{"id":"U1","team_id":"T1","name":"ann"},{"id":"U2","team_id":"T1","name":"bob"}]"#,
    )?;
    let channels: Vec<_> = (0..CHANNELS)
        .map(|c| json!({"id": format!("C{c}"), "name": format!("channel-{c}"), "created": 1_600_000_000}))
        .collect();
    writer.start_file("channels.json", options)?;
    writer.write_all(&serde_json::to_vec(&channels)?)?;
    let mut events = CHANNELS as u64;
    for c in 0..CHANNELS {
        for day in 0..DAYS {
            let start = 1_700_000_000 + day as i64 * 86_400;
            let messages: Vec<_> = (0..PER_DAY)
                .map(|n| {
                    let mut message = json!({"type": "message", "user": if n % 3 == 0 { "U1" } else { "U2" },
                        "ts": format!("{}.{:06}", start + n as i64 * 60, n),
                        "text": format!("message {n} of day {day}: the quarterly numbers look fine but we should \
                                 review the vendor contract before Friday, and the release notes need another \
                                 pass from legal and the platform team before anything ships")});
                    if n % 10 == 1 {
                        message["thread_ts"] = json!(format!("{}.{:06}", start, 0));
                    }
                    if n % 20 == 0 {
                        message["reactions"] = json!([{"name": "thumbsup", "count": 1, "users": ["U1"]}]);
                        events += 1;
                    }
                    events += 1;
                    message
                })
                .collect();
            writer.start_file(
                format!(
                    "channel-{c}/2023-{:02}-{:02}.json",
                    1 + day / 28,
                    1 + day % 28
                ),
                options,
            )?;
            writer.write_all(&serde_json::to_vec(&messages)?)?;
        }
    }
    writer.finish()?;
    Ok(events)
}

fn mattermost_export(path: &Path) -> anyhow::Result<u64> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(file, "{}", json!({"type": "version", "version": 1}))?;
    let count = CHANNELS * DAYS * PER_DAY;
    for n in 0..count {
        writeln!(
            file,
            "{}",
            json!({"type": "post", "post": {"team": "eng", "channel": format!("c{}", n % CHANNELS),
            "user": if n % 3 == 0 { "ann" } else { "bob" }, "create_at": 1_700_000_000_000_i64 + n as i64,
            "message": format!("post {n}: the quarterly numbers look fine but we should review the vendor contract \
                before Friday, and the release notes need another pass from legal and the platform team")}})
        )?;
    }
    Ok(count as u64)
}

/// Reads every unit without sending: the importer's own cost.
async fn read_all(source: &mut dyn Source) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut events = 0;
    for unit in source.units() {
        events += source.read(&unit, None).await?.unit.events.len();
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

async fn import(
    source: &mut dyn Source,
    gateway: &BenchGateway,
    checkpoint: &Path,
    expected: u64,
) -> anyhow::Result<f64> {
    let _ = std::fs::remove_file(checkpoint);
    let mut checkpoint = Checkpoint::open(checkpoint, source.kind(), source.fingerprint(), "acme")?;
    let mut client = Gateway::with_client(gateway.client.clone(), INGEST_TOKEN)?;
    client.max_batch_events = BATCH;
    let summary = chatvault_import::run(
        source,
        "acme",
        &mut client,
        &mut checkpoint,
        std::future::pending(),
        |_| {},
    )
    .await?;
    anyhow::ensure!(
        summary.events_imported == expected && summary.rejected.is_empty(),
        "imported {} of {expected} events, rejected {:?}",
        summary.events_imported,
        summary.rejected.first()
    );
    Ok(summary.events_per_second)
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let slack_path = dir.path().join("slack.zip");
    let slack_events = slack_export(&slack_path)?;
    let mattermost_path = dir.path().join("mattermost.jsonl");
    let mattermost_events = mattermost_export(&mattermost_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cluster = MockCluster::new(1)?;
    let config = mock_cluster_config(&cluster, "bench-import")?;
    runtime.block_on(async move {
        let gateway = BenchGateway::start(&config).await?;
        let options = Options { tenant: "acme".into(), workspace: None };
        let mut slack = SlackExport::open(&slack_path, options)?;
        let mut mattermost = MattermostExport::open(&mattermost_path, "acme")?;
        let checkpoint = dir.path().join("checkpoint");
        batch_run(&gateway.client, 20, BATCH as u64, 1).await?; // warm-up
        let (mut slack_runs, mut mattermost_runs, mut slack_read, mut mattermost_read, mut baseline) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..RUNS {
            let s = import(&mut slack, &gateway, &checkpoint, slack_events).await?;
            let m = import(&mut mattermost, &gateway, &checkpoint, mattermost_events).await?;
            let sr = read_all(&mut slack).await?;
            let mr = read_all(&mut mattermost).await?;
            // The gateway alone, one call at a time like the importer.
            let b = batch_run(&gateway.client, 200, BATCH as u64, 1).await?;
            println!("run {run}: slack-export {s:.0} events/s (read alone {sr:.0}), mattermost {m:.0} events/s (read alone {mr:.0}), IngestBatch {b:.0} events/s");
            slack_runs.push(s);
            mattermost_runs.push(m);
            slack_read.push(sr);
            mattermost_read.push(mr);
            baseline.push(b);
        }
        let b = median(&mut baseline);
        let s = median(&mut slack_runs);
        let m = median(&mut mattermost_runs);
        println!("machine: {}", machine());
        println!("import slack-export ({slack_events} events, {} day files): median {s:.0} events/s, {:.2}x the gateway's own IngestBatch", CHANNELS * DAYS, s / b);
        println!("import mattermost ({mattermost_events} posts): median {m:.0} events/s, {:.2}x the gateway's own IngestBatch", m / b);
        println!("reading alone: slack-export median {:.0} events/s, mattermost {:.0} events/s", median(&mut slack_read), median(&mut mattermost_read));
        println!("gateway IngestBatch ({BATCH} events/call, 1 call at a time): median {b:.0} events/s");
        gateway.stop().await?;
        Ok::<(), anyhow::Error>(())
    })
}
