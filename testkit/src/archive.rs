//! Reading an archive back the way an auditor would, to check the exactly-once promise: every partition's
//! manifest chain is contiguous and hash-linked, every committed file matches its SHA-256 and holds only its
//! manifest's offsets, each Kafka record is archived once, and no file outside the manifests is left behind.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use chatvault_archive::chain::ChainReader;
use chatvault_archive::file::{decode_file, sha256_hex};
use chatvault_archive::manifest::ChainHead;
use chatvault_config::Config;
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

/// An event's identity, `(tenant_id, conversation_id, event_id)`: what readers collapse copies by.
pub type Identity = (String, String, String);

/// What [`audit_archive`] found: the hard checks passed (else it fails); these findings are for the caller to
/// judge, because some are legitimate in some workloads.
#[derive(Debug, Default)]
pub struct ArchiveAudit {
    /// Each partition's committed end offset (the chain head).
    pub heads: BTreeMap<i32, i64>,
    /// Committed manifests, over all partitions.
    pub manifests: usize,
    /// Files named by committed manifests.
    pub files: usize,
    /// Archived rows.
    pub rows: usize,
    /// How many archived rows carry each event id.
    pub rows_per_event_id: HashMap<String, usize>,
    /// How many archived rows carry each identity.
    pub rows_per_identity: HashMap<Identity, usize>,
    /// `(partition, seq, from, to)` of every committed offset gap: records the archive does not hold.
    pub offset_gaps: Vec<(i32, u64, i64, i64)>,
    /// `(partition, seq, offset, reason)` of every rejected record.
    pub rejected_records: Vec<(i32, u64, i64, String)>,
    /// `(partition, offset)` of records archived in more than one row.
    pub offsets_archived_twice: Vec<(i32, i64)>,
    /// Per partition, offsets covered by a manifest (neither a gap nor rejected) that no row holds: the archiver
    /// collapses copies of one identity within a batch into one row, so a retried send produced twice into the
    /// same batch leaves one offset without a row. Any other cause is loss.
    pub offsets_without_row: BTreeMap<i32, Vec<i64>>,
    /// Paths of the files committed manifests name.
    pub named_files: HashSet<String>,
    /// Objects under `events/` that no committed manifest names.
    pub orphans: Vec<String>,
}

/// Reads `partitions`' manifest chains of `config.shared.kafka.topic` from `config.shared.storage` the way an auditor would.
/// Fails on what can never be right: a chain that does not verify (sequence numbers without gaps, contiguous
/// offsets from 0, `prev_sha256` links), a file whose bytes differ from its manifest's SHA-256 or that cannot be
/// decrypted and decoded, a row of another partition or outside its manifest's offset range. Collects the rest
/// (see [`ArchiveAudit`]); the bucket is listed directly for orphans.
pub async fn audit_archive(config: &Config, partitions: &[i32]) -> anyhow::Result<ArchiveAudit> {
    let store = object_store_from_config(&config.shared.storage)?;
    let keys = data_keys(config).await?;
    let chains = ChainReader::new(store.clone(), &config.shared.kafka.topic);
    let mut audit = ArchiveAudit::default();
    let mut named_files = HashSet::new();
    for &partition in partitions {
        // The chain checks (sequence numbers without gaps, contiguous offsets from 0, hash links) are the
        // reader's own, as for every reader of the archive.
        let verified = chains.read_after(partition, &ChainHead::empty()).await;
        if let Some(error) = verified.error {
            anyhow::bail!("partition {partition}: {error}");
        }
        let mut end = 0i64;
        let mut offsets = BTreeSet::new();
        let mut not_in_files = BTreeSet::new();
        for (manifest, _) in verified.manifests {
            let seq = manifest.seq;
            // Rows of rewritten files leave their offsets' manifests: this audit's offset accounting assumes
            // an archive without disposition.
            ensure!(
                !manifest.is_rewrite(),
                "partition {partition} manifest {seq} is a rewrite commit; audit_archive checks archives without rewrites"
            );
            audit.manifests += 1;
            for rejected in &manifest.rejected_records {
                audit.rejected_records.push((
                    partition,
                    seq,
                    rejected.offset,
                    rejected.reason.clone(),
                ));
                not_in_files.insert(rejected.offset);
            }
            for gap in &manifest.offset_gaps {
                audit.offset_gaps.push((partition, seq, gap.from, gap.to));
                not_in_files.extend(gap.from..gap.to);
            }
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
                    if !offsets.insert(row.kafka_offset) {
                        audit
                            .offsets_archived_twice
                            .push((partition, row.kafka_offset));
                    }
                    audit.rows += 1;
                    let event = row.record;
                    *audit
                        .rows_per_event_id
                        .entry(event.event_id.clone())
                        .or_default() += 1;
                    *audit
                        .rows_per_identity
                        .entry((event.tenant_id, event.conversation_id, event.event_id))
                        .or_default() += 1;
                }
                audit.files += 1;
                named_files.insert(file.path.clone());
            }
            end = manifest.end_offset;
        }
        let without_row: Vec<i64> = (0..end)
            .filter(|offset| !offsets.contains(offset) && !not_in_files.contains(offset))
            .collect();
        if !without_row.is_empty() {
            audit.offsets_without_row.insert(partition, without_row);
        }
        audit.heads.insert(partition, end);
    }
    let stored: Vec<String> = store
        .list(Some(&"events".into()))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await?;
    audit.orphans = stored
        .into_iter()
        .filter(|path| !named_files.contains(path))
        .collect();
    audit.named_files = named_files;
    Ok(audit)
}

/// [`audit_archive`], failing on every finding: every offset below the head archived exactly once (so the
/// workload must not repeat an event id within a batch), no rejected records, no offset gaps, and no event file
/// that no manifest names.
pub async fn verify_archive(config: &Config, partitions: &[i32]) -> anyhow::Result<ArchiveReport> {
    let audit = audit_archive(config, partitions).await?;
    if let Some((partition, seq, offset, reason)) = audit.rejected_records.first() {
        anyhow::bail!(
            "partition {partition} seq {seq}: rejected record at offset {offset}: {reason}"
        );
    }
    if let Some((partition, seq, from, to)) = audit.offset_gaps.first() {
        anyhow::bail!(
            "partition {partition} seq {seq}: no record may be skipped: gap [{from}, {to})"
        );
    }
    if let Some((partition, offset)) = audit.offsets_archived_twice.first() {
        anyhow::bail!("partition {partition} offset {offset} archived twice");
    }
    if let Some((partition, missing)) = audit.offsets_without_row.iter().next() {
        anyhow::bail!(
            "partition {partition}: offsets {missing:?} are covered by manifests but not archived"
        );
    }
    ensure!(
        audit.orphans.is_empty(),
        "files outside any manifest remain: {:?}",
        audit.orphans
    );
    Ok(ArchiveReport {
        heads: audit.heads,
        rows_per_event_id: audit.rows_per_event_id,
    })
}

/// [`verify_archive`] over every partition of the topic on `brokers`, plus: every partition archived up to its
/// high watermark, and every id in `acknowledged` archived.
pub async fn verify_exactly_once(
    config: &Config,
    brokers: &str,
    acknowledged: &BTreeSet<String>,
) -> anyhow::Result<ArchiveReport> {
    let watermarks = high_watermarks(brokers, &config.shared.kafka.topic)?;
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
    let store = object_store_from_config(&config.shared.storage)?;
    let chains = ChainReader::new(store, &config.shared.kafka.topic);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let mut complete = true;
        for (partition, high) in high_watermarks(brokers, &config.shared.kafka.topic)? {
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
