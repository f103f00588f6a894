//! Randomized tamper trials against the transparency log and `verify` (issue: provably untampered). An
//! archive is written the archiver's way (encrypted Parquet files, manifest chains on two partitions, two
//! signed checkpoints, a few manifests after the last one), then copied and altered, one alteration per
//! trial: a byte flipped in a Parquet file, a manifest, a log bundle or a checkpoint; a file removed,
//! replaced by another or added; manifests removed, reordered or truncated from a partition's end; a
//! checkpoint replaced by one signed with another key; the log rewritten and re-signed by an attacker; the
//! log rolled back. Every trial must be detected and named; the untouched archive verifies clean.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chatvault_archive::keys::DataKeys;
use chatvault_archive::tlog::note::{NoteSigner, SigningKey, VerifierKey};
use chatvault_archive::tlog::{Committer, LogTrust, Round};
use chatvault_archive::verify::{Problem, Sampling, VerifyReport, verify_archive};
use chatvault_restorer::testing::Fixture;
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;

const TOPIC: &str = "chatvault.events";
const TRIALS: u64 = 210;

/// A small deterministic generator (xorshift64*), so a failing trial can be replayed from its number.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }
}

fn store_at(dir: &Path) -> anyhow::Result<Arc<dyn ObjectStore>> {
    Ok(Arc::new(LocalFileSystem::new_with_prefix(dir)?))
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Every file under `dir/relative`, as paths relative to `dir`, sorted.
fn files_under(dir: &Path, relative: &str) -> Vec<String> {
    fn walk(root: &Path, at: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(at) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(
                    path.strip_prefix(root)
                        .expect("under root")
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &dir.join(relative), &mut out);
    out.retain(|path| !path.contains("/pending/"));
    out.sort();
    out
}

fn manifests_of(dir: &Path, partition: i32) -> Vec<String> {
    files_under(
        dir,
        &format!("manifests/topic={TOPIC}/partition={partition}"),
    )
}

fn flip_byte(path: &Path, rng: &mut Rng) {
    let mut bytes = std::fs::read(path).expect("read");
    let at = rng.below(bytes.len());
    bytes[at] ^= 1 << rng.below(8);
    std::fs::write(path, bytes).expect("write");
}

/// Whether `report` names the alteration: a problem mentioning `needle` (a path, or a partition's chain).
fn named(report: &VerifyReport, needle: &str) -> bool {
    let text = serde_json::to_string(&report.problems).expect("json");
    text.contains(needle)
}

struct Archive {
    _dir: tempfile::TempDir,
    root: PathBuf,
    key: VerifierKey,
    newest_checkpoint: String,
}

async fn build_archive() -> anyhow::Result<Archive> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("archive");
    std::fs::create_dir_all(&root)?;
    let store = store_at(&root)?;
    let keys = DataKeys::with_local_keyring(store.clone(), &dir.path().join("keyring.json"))?;
    let fixture = Fixture::over(store.clone(), keys, TOPIC);
    let (signing, _) = SigningKey::generate("chatvault.test/tamper")?;
    let key = VerifierKey::parse(&signing.verifier_key())?;
    let committer = Committer::new(store.clone(), Arc::new(signing), "test-committer", None)?;
    let batch = |tenant: &str, first: u64| -> Vec<chatvault_proto::v1::ChatEvent> {
        (first..first + 3)
            .map(|i| common::message_event(tenant, &format!("m{i}"), &format!("text {i}")))
            .collect()
    };
    let mut newest_checkpoint = String::new();
    for round in 0..2u64 {
        for seq in 0..3u64 {
            let first = round * 100 + seq * 10;
            let mut events = batch("acme", first);
            events.extend(batch("globex", first));
            fixture.commit_batch(0, &events).await;
            fixture.commit_batch(1, &batch("acme", 1_000 + first)).await;
        }
        let Round::Signed { checkpoint, .. } = committer.run_once().await? else {
            anyhow::bail!("round {round} signed nothing");
        };
        newest_checkpoint = checkpoint;
    }
    // Committed after the newest checkpoint: not covered yet.
    fixture.commit_batch(1, &batch("acme", 5_000)).await;
    Ok(Archive {
        _dir: dir,
        root,
        key,
        newest_checkpoint,
    })
}

async fn verify(root: &Path, archive: &Archive) -> anyhow::Result<VerifyReport> {
    let trust = LogTrust {
        keys: vec![archive.key.clone()],
        kept_checkpoints: vec![archive.newest_checkpoint.clone()],
        witness: None,
    };
    Ok(verify_archive(store_at(root)?, &trust, Sampling::All, |_| {}).await?)
}

/// Applies alteration `kind` to the archive at `root`; returns what it did and what the report must name.
async fn tamper(root: &Path, kind: usize, rng: &mut Rng) -> anyhow::Result<(String, String)> {
    let parquet = files_under(root, "events");
    let log_files = files_under(root, "log");
    let pick = |files: &[String], rng: &mut Rng| files[rng.below(files.len())].clone();
    Ok(match kind {
        0 => {
            let file = pick(&parquet, rng);
            flip_byte(&root.join(&file), rng);
            (format!("flipped a byte of {file}"), file)
        }
        1 => {
            let partition = rng.below(2) as i32;
            let manifests = manifests_of(root, partition);
            // Only manifests covered by a checkpoint (partition 1's last is not).
            let covered = &manifests[..6];
            let file = pick(covered, rng);
            flip_byte(&root.join(&file), rng);
            (
                format!("flipped a byte of {file}"),
                format!("\"partition\":{partition}"),
            )
        }
        2 => {
            let file = pick(&log_files, rng);
            flip_byte(&root.join(&file), rng);
            (format!("flipped a byte of {file}"), file)
        }
        3 => {
            let file = pick(&parquet, rng);
            std::fs::remove_file(root.join(&file))?;
            (format!("removed {file}"), file)
        }
        4 => {
            let file = pick(&parquet, rng);
            let other = pick(&parquet, rng);
            let replacement = if other == file {
                b"PAR1 not the file".to_vec()
            } else {
                std::fs::read(root.join(&other))?
            };
            std::fs::write(root.join(&file), replacement)?;
            (format!("replaced {file} by {other}"), file)
        }
        5 => {
            let file = format!(
                "events/tenant=acme/date=2026-11-25/p00000-o{:020}-stray-000.parquet",
                rng.below(1000)
            );
            std::fs::create_dir_all(root.join(&file).parent().expect("parent"))?;
            std::fs::write(root.join(&file), b"PAR1 planted")?;
            (format!("added {file}"), file)
        }
        6 => {
            let partition = rng.below(2) as i32;
            let manifests = manifests_of(root, partition);
            let a = rng.below(5);
            let b = a + 1 + rng.below(5 - a);
            let (pa, pb) = (root.join(&manifests[a]), root.join(&manifests[b]));
            let (ba, bb) = (std::fs::read(&pa)?, std::fs::read(&pb)?);
            std::fs::write(&pa, bb)?;
            std::fs::write(&pb, ba)?;
            (
                format!("swapped manifests {a} and {b} of partition {partition}"),
                format!("\"partition\":{partition}"),
            )
        }
        7 => {
            let partition = rng.below(2) as i32;
            let manifests = manifests_of(root, partition);
            let at = rng.below(5);
            std::fs::remove_file(root.join(&manifests[at]))?;
            (
                format!("removed manifest {at} of partition {partition}"),
                format!("\"partition\":{partition}"),
            )
        }
        8 => {
            // Truncation: a partition's newest covered manifests (and whatever follows) removed.
            let partition = rng.below(2) as i32;
            let manifests = manifests_of(root, partition);
            let keep = 1 + rng.below(5);
            for file in &manifests[keep..] {
                std::fs::remove_file(root.join(file))?;
            }
            (
                format!("truncated partition {partition} to {keep} manifest(s)"),
                format!("\"partition\":{partition}"),
            )
        }
        9 => {
            // A checkpoint replaced by one of another key, same size and root.
            let checkpoints = files_under(root, "log/checkpoints");
            let file = pick(&checkpoints, rng);
            let note = std::fs::read_to_string(root.join(&file))?;
            let text = &note[..note.rfind("\n\n").expect("note") + 1];
            let (forger, _) = SigningKey::generate("chatvault.test/tamper")?;
            std::fs::write(root.join(&file), forger.sign_note(text)?)?;
            (format!("re-signed {file} with another key"), file)
        }
        10 => {
            // The attacker rewrites history and the log: drops partition 0's newest manifest, removes the
            // whole log, and writes a log of their own, signed with their key.
            let manifests = manifests_of(root, 0);
            std::fs::remove_file(root.join(manifests.last().expect("manifest")))?;
            std::fs::remove_dir_all(root.join("manifests/topic=_log"))?;
            std::fs::remove_dir_all(root.join("log"))?;
            let (forger, _) = SigningKey::generate("chatvault.test/tamper")?;
            let attacker = Committer::new(store_at(root)?, Arc::new(forger), "attacker", None)?;
            attacker.run_once().await?;
            ("re-signed the log with another key".into(), "log/".into())
        }
        11 => {
            // Roll the log back to its first checkpoint: only a kept or witnessed checkpoint exposes it.
            let log = files_under(root, "manifests/topic=_log");
            std::fs::remove_file(root.join(log.last().expect("log manifest")))?;
            ("rolled the log back".into(), "rolled back".into())
        }
        _ => unreachable!(),
    })
}

const KINDS: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_detects_every_randomized_alteration_and_names_it() -> anyhow::Result<()> {
    let archive = build_archive().await?;
    let clean = verify(&archive.root, &archive).await?;
    assert!(clean.is_intact(), "{:#?}", clean.problems);
    assert!(clean.unreferenced.is_empty(), "{:?}", clean.unreferenced);
    assert_eq!(clean.log.checkpoints, 2);
    assert_eq!(clean.log.tree_size, 12);
    assert_eq!(clean.log.covered_manifests, 12);
    assert_eq!(clean.log.uncovered_manifests, 1);
    assert_eq!(clean.log.external_checkpoints_matched, 1);
    assert!(clean.log.signatures_checked);

    let work = tempfile::tempdir()?;
    let mut per_kind = [0u32; KINDS];
    for trial in 0..TRIALS {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (trial + 1).wrapping_mul(0x1000_0000_01b3));
        let kind = (trial as usize) % KINDS;
        let root = work.path().join(format!("trial-{trial}"));
        copy_dir(&archive.root, &root)?;
        let (what, needle) = tamper(&root, kind, &mut rng).await?;
        let report = verify(&root, &archive).await?;
        let planted = report
            .unreferenced
            .iter()
            .any(|file| !file.named_by_intent && file.path == needle);
        assert!(
            !report.is_intact() || planted,
            "trial {trial} ({what}) went undetected: {report:#?}"
        );
        assert!(
            planted || named(&report, &needle),
            "trial {trial} ({what}) was detected but not named ({needle}): {:#?}",
            report.problems
        );
        if kind == 10 {
            assert!(
                report
                    .problems
                    .iter()
                    .any(|problem| matches!(problem, Problem::BadLog { detail, .. } if detail.contains("trusted key"))),
                "trial {trial} ({what}): the foreign signature is not named: {:#?}",
                report.problems
            );
        }
        per_kind[kind] += 1;
        std::fs::remove_dir_all(&root)?;
    }
    assert!(per_kind.iter().all(|n| *n >= 17), "{per_kind:?}");
    Ok(())
}
