//! `chatvault verify` over an archive of realistic size: by default 1,000 encrypted Parquet files of 500
//! ~500-byte messages each (3 tenants, 4 partitions, one file per manifest), written the archiver's way on a
//! local-filesystem store, with a signed checkpoint every 100 manifests. Three runs of a full verify (every
//! chain, file, key record and the transparency log) and three of `--sample 100`, alternating; the baseline is
//! the floor any verifier pays, reading every file and hashing it with SHA-256 at the same concurrency, run
//! in the same process. Medians in files/s and MB/s, and the ratio against the baseline, are printed.
//! `cargo bench -p chatvault-benches --bench verify_archive`; CHATVAULT_BENCH_VERIFY_FILES and
//! CHATVAULT_BENCH_VERIFY_EVENTS change the archive's size.

use std::sync::Arc;
use std::time::Instant;

use chatvault_archive::keys::DataKeys;
use chatvault_archive::tlog::note::{NoteSigner, SigningKey, VerifierKey};
use chatvault_archive::tlog::{Committer, LogTrust, Round};
use chatvault_archive::verify::{Sampling, VerifyReport, verify_archive};
use chatvault_benches::{chat_message, machine, median};
use chatvault_core::time::now_micros;
use chatvault_restorer::testing::Fixture;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

const ROUNDS: usize = 3;
const PARTITIONS: i32 = 4;
const TENANTS: [&str; 3] = ["acme", "globex", "initech"];
const SAMPLE: u64 = 100;
/// The verifier's concurrency (`archive::verify`), matched by the baseline.
const FILES_AT_ONCE: usize = 8;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Reads and hashes every file under `events/`: (files, bytes).
async fn read_and_hash_everything(store: &Arc<dyn ObjectStore>) -> anyhow::Result<(u64, u64)> {
    let paths: Vec<Path> = store
        .list(Some(&Path::from("events")))
        .map_ok(|object| object.location)
        .try_collect()
        .await?;
    let mut reads = futures::stream::iter(paths)
        .map(|path| {
            let store = store.clone();
            async move {
                let bytes = store.get(&path).await?.bytes().await?;
                let size = bytes.len() as u64;
                tokio::task::spawn_blocking(move || {
                    ring::digest::digest(&ring::digest::SHA256, &bytes)
                })
                .await?;
                anyhow::Ok(size)
            }
        })
        .buffer_unordered(FILES_AT_ONCE);
    let (mut files, mut bytes) = (0, 0);
    while let Some(size) = reads.next().await {
        files += 1;
        bytes += size?;
    }
    Ok((files, bytes))
}

struct Figures {
    files_per_second: Vec<f64>,
    megabytes_per_second: Vec<f64>,
    seconds: Vec<f64>,
}

impl Figures {
    fn new() -> Figures {
        Figures {
            files_per_second: Vec::new(),
            megabytes_per_second: Vec::new(),
            seconds: Vec::new(),
        }
    }

    fn record(&mut self, files: u64, bytes: u64, seconds: f64) {
        self.files_per_second.push(files as f64 / seconds);
        self.megabytes_per_second.push(bytes as f64 / 1e6 / seconds);
        self.seconds.push(seconds);
    }

    fn print(&mut self, what: &str, baseline_seconds: Option<f64>) -> f64 {
        let seconds = median(&mut self.seconds);
        let ratio = baseline_seconds
            .map(|baseline| format!(", {:.2}x the baseline's time", seconds / baseline))
            .unwrap_or_default();
        println!(
            "{what:<34} median {:>8.0} files/s {:>8.1} MB/s  ({seconds:.2} s{ratio})",
            median(&mut self.files_per_second),
            median(&mut self.megabytes_per_second),
        );
        seconds
    }
}

fn check(report: &VerifyReport) -> anyhow::Result<()> {
    anyhow::ensure!(report.is_intact(), "problems: {:?}", report.problems);
    anyhow::ensure!(
        report.log.signatures_checked && report.log.checkpoints > 0,
        "the log did not verify: {:?}",
        report.log
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let files = setting("CHATVAULT_BENCH_VERIFY_FILES", 1_000);
    let events_per_file = setting("CHATVAULT_BENCH_VERIFY_EVENTS", 500);
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("archive");
    std::fs::create_dir_all(&root)?;
    let store: Arc<dyn ObjectStore> = Arc::new(
        object_store::local::LocalFileSystem::new_with_prefix(&root)?,
    );
    let keys = DataKeys::with_local_keyring(store.clone(), &dir.path().join("keyring.json"))?;
    let fixture = Fixture::over(store.clone(), keys, "chatvault.events");
    let (signing, _) = SigningKey::generate("bench.chatvault.example/verify")?;
    let verifier = VerifierKey::parse(&signing.verifier_key())?;
    let committer = Committer::new(store.clone(), Arc::new(signing), "bench", None)?;

    let started = Instant::now();
    let now = now_micros();
    for file in 0..files {
        let tenant = TENANTS[file as usize % TENANTS.len()];
        // One hour of messages per file, so that each batch is one tenant's day: one file.
        let events: Vec<_> = (0..events_per_file)
            .map(|i| {
                let mut event = chat_message(tenant, file * events_per_file + i, now);
                event.occurred_at_micros = now - 86_400_000_000 + i as i64;
                event
            })
            .collect();
        fixture
            .commit_batch((file % PARTITIONS as u64) as i32, &events)
            .await;
        if (file + 1) % 100 == 0 {
            let round = committer.run_once().await?;
            anyhow::ensure!(matches!(round, Round::Signed { .. }), "{round:?}");
        }
    }
    let (stored_files, stored_bytes) = read_and_hash_everything(&store).await?;
    println!(
        "verify_archive: {stored_files} files, {:.1} MB ({events_per_file} events each), written in {:.1} s; {}",
        stored_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        machine()
    );

    let trust = LogTrust {
        keys: vec![verifier],
        kept_checkpoints: Vec::new(),
        witness: None,
    };
    let (mut baseline, mut full, mut sampled) = (Figures::new(), Figures::new(), Figures::new());
    for round in 0..ROUNDS {
        let started = Instant::now();
        let (files, bytes) = read_and_hash_everything(&store).await?;
        baseline.record(files, bytes, started.elapsed().as_secs_f64());

        let started = Instant::now();
        let report = verify_archive(store.clone(), &trust, Sampling::All, |_| {}).await?;
        full.record(
            report.files_checked,
            report.bytes_checked,
            started.elapsed().as_secs_f64(),
        );
        check(&report)?;

        let started = Instant::now();
        let sampling = Sampling::Sample {
            files: SAMPLE,
            seed: round as u64,
        };
        let report = verify_archive(store.clone(), &trust, sampling, |_| {}).await?;
        sampled.record(
            report.files_checked,
            report.bytes_checked,
            started.elapsed().as_secs_f64(),
        );
        check(&report)?;
    }
    let floor = baseline.print("baseline (read + SHA-256 only)", None);
    full.print("verify (everything)", Some(floor));
    sampled.print(&format!("verify --sample {SAMPLE}"), Some(floor));
    Ok(())
}
