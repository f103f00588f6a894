//! Reading an archive back the way an auditor would, to check the exactly-once promise: every partition's
//! manifest chain is contiguous and hash-linked, every committed file matches its SHA-256 and holds only its
//! manifest's offsets, each Kafka record is archived once, and no file outside the manifests is left behind.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use chatvault_archive::chain::ChainReader;
use chatvault_archive::file::{decode_file, sha256_hex};
use chatvault_archive::manifest::ChainHead;
use chatvault_core::config::Config;
use chatvault_core::storage::object_store_from_config;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;

use crate::kafka::high_watermarks;
use crate::pipeline::data_keys;

/// What [`verify_archive`] read.
#[derive(Debug, Default)]
pub struct ArchiveReport {
    /// Each partition's committed end offset (the chain head).
    pub heads: BTreeMap<i32, i64>,
    /// How many archived rows carry each event id.
    pub rows_per_event_id: HashMap<String, usize>,
}

impl ArchiveReport {
    /// Fails unless every id in `acknowledged` is archived in exactly one row.
    pub fn ensure_each_once<'a>(
        &self,
        acknowledged: impl IntoIterator<Item = &'a String>,
    ) -> anyhow::Result<()> {
        let mut missing = Vec::new();
        let mut repeated = Vec::new();
        for event_id in acknowledged {
            match self.rows_per_event_id.get(event_id) {
                None => missing.push(event_id.clone()),
                Some(1) => {}
                Some(rows) => repeated.push(format!("{event_id} ({rows} rows)")),
            }
        }
        ensure!(
            missing.is_empty(),
            "{} acknowledged events are not archived, for example {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        ensure!(
            repeated.is_empty(),
            "acknowledged events archived more than once: {:?}",
            &repeated[..repeated.len().min(5)]
        );
        Ok(())
    }
}

/// Reads `partitions`' manifest chains of `config.kafka.topic` from `config.storage` and checks them: sequence
/// numbers without gaps, `start_offset` of each manifest equal to the previous `end_offset` (from 0),
/// `prev_sha256` links, file SHA-256s, rows inside their manifest's range, every offset below the head archived
/// exactly once (so the workload must not repeat an event id within a batch), no rejected records, no offset
/// gaps, and no event file that no manifest names.
pub async fn verify_archive(config: &Config, partitions: &[i32]) -> anyhow::Result<ArchiveReport> {
    let store = object_store_from_config(&config.storage)?;
    let keys = data_keys(config)?;
    let chains = ChainReader::new(store.clone(), &config.kafka.topic);
    let mut report = ArchiveReport::default();
    let mut named_files = HashSet::new();
    for &partition in partitions {
        // The chain checks (sequence numbers without gaps, contiguous offsets from 0, hash links) are the
        // reader's own, as for every reader of the archive.
        let verified = chains.read_after(partition, &ChainHead::empty()).await;
        if let Some(error) = verified.error {
            anyhow::bail!("partition {partition}: {error}");
        }
        let mut expected_start = 0i64;
        let mut offsets = BTreeSet::new();
        for (manifest, _) in verified.manifests {
            let seq = manifest.seq;
            ensure!(
                manifest.rejected_records.is_empty(),
                "partition {partition} seq {seq}: rejected records {:?}",
                manifest.rejected_records
            );
            ensure!(
                manifest.offset_gaps.is_empty(),
                "partition {partition} seq {seq}: no record may be skipped: {:?}",
                manifest.offset_gaps
            );
            for file in &manifest.files {
                let bytes = store
                    .get(&file.path.as_str().into())
                    .await
                    .with_context(|| format!("reading {}", file.path))?
                    .bytes()
                    .await?;
                ensure!(
                    sha256_hex(&bytes) == file.sha256,
                    "{}: bytes differ from the manifest",
                    file.path
                );
                let key = keys.get(&file.tenant_id, &file.key_period).await?;
                for row in decode_file(bytes, &key, None)? {
                    ensure!(
                        row.kafka_partition == partition,
                        "{}: row of partition {}",
                        file.path,
                        row.kafka_partition
                    );
                    ensure!(
                        (manifest.start_offset..manifest.end_offset).contains(&row.kafka_offset),
                        "{}: offset {} outside its manifest's range",
                        file.path,
                        row.kafka_offset
                    );
                    ensure!(
                        offsets.insert(row.kafka_offset),
                        "partition {partition} offset {} archived twice",
                        row.kafka_offset
                    );
                    *report
                        .rows_per_event_id
                        .entry(row.event.event_id)
                        .or_default() += 1;
                }
                named_files.insert(file.path.clone());
            }
            expected_start = manifest.end_offset;
        }
        let missing: Vec<i64> = (0..expected_start)
            .filter(|offset| !offsets.contains(offset))
            .collect();
        ensure!(
            missing.is_empty(),
            "partition {partition}: offsets {missing:?} are covered by manifests but not archived"
        );
        report.heads.insert(partition, expected_start);
    }
    let stored: Vec<String> = store
        .list(Some(&"events".into()))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await?;
    let orphans: Vec<&String> = stored
        .iter()
        .filter(|path| !named_files.contains(*path))
        .collect();
    ensure!(
        orphans.is_empty(),
        "files outside any manifest remain: {orphans:?}"
    );
    Ok(report)
}

/// [`verify_archive`] over every partition of the topic on `brokers`, plus: every partition archived up to its
/// high watermark, and every id in `acknowledged` archived.
pub async fn verify_exactly_once(
    config: &Config,
    brokers: &str,
    acknowledged: &BTreeSet<String>,
) -> anyhow::Result<ArchiveReport> {
    let watermarks = high_watermarks(brokers, &config.kafka.topic)?;
    let partitions: Vec<i32> = watermarks.iter().map(|(partition, _)| *partition).collect();
    let report = verify_archive(config, &partitions).await?;
    for (partition, high_watermark) in &watermarks {
        let head = report.heads.get(partition).copied().unwrap_or_default();
        ensure!(
            head == *high_watermark,
            "partition {partition}: archived up to offset {head} of {high_watermark}"
        );
    }
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|event_id| !report.rows_per_event_id.contains_key(*event_id))
        .collect();
    ensure!(
        missing.is_empty(),
        "{} acknowledged events are not archived, for example {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    Ok(report)
}

/// Waits until every partition's manifest chain head reached the partition's high watermark; returns whether
/// it did within `timeout`.
pub async fn wait_for_archive(
    config: &Config,
    brokers: &str,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let store = object_store_from_config(&config.storage)?;
    let chains = ChainReader::new(store, &config.kafka.topic);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let mut complete = true;
        for (partition, high) in high_watermarks(brokers, &config.kafka.topic)? {
            let head = chains.head(partition).await?;
            complete &= head.end_offset == high;
        }
        if complete {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(false)
}
