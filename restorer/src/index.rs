//! The in-memory index of committed archive files, built from the manifest chains.
//!
//! Only files named by a committed manifest are ever listed here, so orphans left under `events/` by crashed or
//! fenced writers are never read. Chains are read through [`ChainReader::read_after`], which verifies them
//! link by link: manifest `seq` must carry the SHA-256 of manifest `seq - 1`'s bytes and start at the Kafka
//! offset where its predecessor ended. A break means the archive was altered (a manifest rewritten, removed or
//! reordered).
//!
//! A break is contained to the requests it could affect. The verified prefix of a broken chain (partition `N`,
//! manifests before seq `S`) is kept, and the chain is read again from there on every refresh, so a repair
//! is noticed. What the manifests from `S` on hold is unknown: they cannot be trusted, not even for which
//! tenants they name. So a tenant counts as affected when it has any file in partition `N`'s verified prefix
//! (its events most likely continue there: Kafka keys by tenant and conversation), and every tenant counts as
//! affected when that prefix is empty (nothing is known about the partition). Requests of affected tenants
//! fail with the chain's error (INTERNAL, naming the partition and seq); every other tenant is served from
//! the intact chains. What remains uncertain: a tenant whose first events in partition `N` would come after
//! the break is served without them (the index cannot tell it from a tenant that never wrote there); the
//! break is logged and listed by [`ArchiveIndex::broken_chains`] so an operator repairs it.
//!
//! **The transparency log.** Given trusted verifier keys ([`ArchiveIndex::with_trusted_keys`]), every refresh
//! also reads the log's newest checkpoint (before the chains, so the chains read are at least as new as it),
//! verifies its signature, and compares what it vouches for with the chains: per partition, the manifest the
//! checkpoint logged last must be the one the verified chain holds at that sequence number (links hash back,
//! so the whole prefix is then covered). A partition the log contradicts (a covered manifest replaced, or
//! removed along with everything after it) fails its tenants' requests like a broken chain; a log whose
//! newest entry does not verify fails every request. Files of manifests committed after the newest
//! checkpoint are served, and [`Selection::coverage`] says how many of a request's files are not yet covered.
//!
//! Refreshes are incremental: per partition the index remembers the last verified manifest (its sequence
//! number, hash and end offset) and lists only newer ones. A tokio mutex serializes refreshes so concurrent
//! requests do not read the same manifests twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chatvault_archive::chain::ChainReader;
use chatvault_archive::file::conversation_digest;
use chatvault_archive::manifest::{ChainHead, LiveFiles, ManifestFile};
use chatvault_archive::tlog::Bundle;
use chatvault_archive::tlog::committer::{fetch_committed, log_files, newest_log_state};
use chatvault_archive::tlog::merkle::{self, Hash, inclusion_proof};
use chatvault_archive::tlog::note::VerifierKey;
use chatvault_archive::tlog::{LOG_PARTITION, LOG_TOPIC};
use chatvault_core::{Error, ErrorCode, Result};
use futures::StreamExt;
use object_store::ObjectStore;
use tokio::sync::Mutex;

/// A committed file and the manifest (partition, sequence number) that commits it.
#[derive(Debug, Clone)]
struct IndexedFile {
    file: Arc<ManifestFile>,
    partition: i32,
    seq: u64,
}

#[derive(Debug, Default)]
struct IndexState {
    /// Per partition, the head after the last manifest verified.
    cursors: HashMap<i32, ChainHead>,
    /// Per partition, the SHA-256 of every verified manifest, by sequence number.
    manifest_shas: HashMap<i32, Vec<String>>,
    /// Committed files per tenant, in chain order (partition by partition, sequence by sequence).
    files_by_tenant: HashMap<String, Vec<IndexedFile>>,
    /// Per partition, the tenants with a file in its verified manifests.
    tenants_by_partition: HashMap<i32, HashSet<String>>,
    /// Per partition, the live files of its verified manifests, to apply rewrite commits.
    live: HashMap<i32, LiveFiles>,
    /// Partitions whose chain could not be verified past their cursor at the last refresh, with why.
    broken: BTreeMap<i32, BrokenChain>,
    /// What the transparency log vouches for, when trusted keys are given.
    log: LogView,
}

/// The newest checkpoint as of the last refresh and what it covers of this index's topic.
#[derive(Debug, Default)]
struct LogView {
    /// The log chain's head after its last verified manifest.
    cursor: Option<ChainHead>,
    /// The newest checkpoint (signed note), its tree size and root; none before the first.
    checkpoint: Option<(String, u64, Hash)>,
    /// Per partition, the manifests `[0, n)` the newest checkpoint covers.
    covered: HashMap<i32, u64>,
    /// Per partition, the logged head: (next seq, SHA-256 of manifest `next seq - 1`).
    logged: HashMap<i32, (u64, String)>,
    /// Partitions whose verified chain the log contradicts, with why.
    contradicted: BTreeMap<i32, BrokenChain>,
    /// Why the log's newest entry does not verify: every request fails while it is set.
    error: Option<String>,
    /// The log's leaf hashes, loaded by the first evidence request ([`ArchiveIndex::log_proofs`]) and
    /// extended bundle by bundle after: the log manifests `[0, leaves_through)` are in it.
    leaves: Vec<Hash>,
    leaves_through: u64,
    /// The leaf index of each manifest of this index's topic, by (partition, seq).
    leaf_of: HashMap<(i32, u64), u64>,
}

/// How far the transparency log vouches for the files of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coverage {
    /// No trusted verifier keys were given (`integrity.trusted_keys`): coverage is not checked.
    NotChecked,
    /// Trusted keys are given but no checkpoint has been signed yet.
    NoCheckpoint,
    /// The newest checkpoint verified with a trusted key; `uncovered_files` of the files were committed after
    /// it (the next checkpoint will cover them).
    Checkpoint {
        /// The checkpoint as a signed note.
        note: String,
        tree_size: u64,
        covered_files: u64,
        uncovered_files: u64,
    },
}

/// The files one request reads, and how far the log vouches for them.
#[derive(Debug, Clone)]
pub struct Selection {
    pub files: Vec<Arc<ManifestFile>>,
    /// Per file (same order), the manifest committing it: (partition, seq).
    pub locations: Vec<(i32, u64)>,
    pub coverage: Coverage,
}

#[derive(Debug, Clone)]
struct BrokenChain {
    code: ErrorCode,
    message: String,
}

impl IndexState {
    /// Fails when a broken chain could hold files of `tenant` (see the module documentation).
    fn check_tenant(&self, tenant: &str) -> Result<()> {
        if let Some(error) = &self.log.error {
            return Err(Error::internal(format!(
                "the archive of tenant {tenant} is not served: {error}"
            )));
        }
        for (partition, broken) in self.broken.iter().chain(&self.log.contradicted) {
            let affected = match self.tenants_by_partition.get(partition) {
                Some(tenants) if !tenants.is_empty() => tenants.contains(tenant),
                // Nothing of the partition is verified: any tenant may have files there.
                _ => true,
            };
            if affected {
                return Err(Error::new(
                    broken.code,
                    format!(
                        "the archive of tenant {tenant} cannot be restored completely: {}",
                        broken.message
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Committed files of one topic's manifest chains, grouped by tenant.
#[derive(Debug)]
pub struct ArchiveIndex {
    chains: ChainReader,
    /// Keys whose checkpoints are trusted; empty: the log is not checked.
    trusted_keys: Vec<VerifierKey>,
    state: Mutex<IndexState>,
    manifests_read: AtomicU64,
}

/// A time range of event times in microseconds: `from` inclusive, `to` exclusive, zero meaning unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeRange {
    pub from_micros: i64,
    pub to_micros: i64,
}

impl TimeRange {
    pub const UNBOUNDED: TimeRange = TimeRange {
        from_micros: 0,
        to_micros: 0,
    };

    pub fn new(from_micros: i64, to_micros: i64) -> TimeRange {
        TimeRange {
            from_micros,
            to_micros,
        }
    }

    pub fn contains(&self, micros: i64) -> bool {
        (self.from_micros == 0 || micros >= self.from_micros)
            && (self.to_micros == 0 || micros < self.to_micros)
    }

    /// Whether any instant of the closed interval `[min, max]` lies in the range.
    pub fn overlaps(&self, min_micros: i64, max_micros: i64) -> bool {
        (self.from_micros == 0 || max_micros >= self.from_micros)
            && (self.to_micros == 0 || min_micros < self.to_micros)
    }
}

impl ArchiveIndex {
    pub fn new(store: Arc<dyn ObjectStore>, topic: &str) -> ArchiveIndex {
        ArchiveIndex {
            chains: ChainReader::new(store, topic),
            trusted_keys: Vec::new(),
            state: Mutex::new(IndexState::default()),
            manifests_read: AtomicU64::new(0),
        }
    }

    /// Checks what is served against the transparency log's checkpoints signed by one of `keys` (see the
    /// module documentation).
    pub fn with_trusted_keys(mut self, keys: Vec<VerifierKey>) -> ArchiveIndex {
        self.trusted_keys = keys;
        self
    }

    /// The keys whose checkpoints are trusted (empty: the log is not checked).
    pub fn trusted_keys(&self) -> &[VerifierKey] {
        &self.trusted_keys
    }

    /// The stream whose chains this index reads.
    pub fn topic(&self) -> &str {
        self.chains.topic()
    }

    /// How many manifests were read from storage since start (a metric; incremental refreshes keep it low).
    pub fn manifests_read(&self) -> u64 {
        self.manifests_read.load(Ordering::Relaxed)
    }

    /// Reads the manifests committed since the last refresh, verifying each link of every chain; fails with
    /// the first broken chain's error (requests for single tenants fail only when a break affects them).
    pub async fn refresh(&self) -> Result<()> {
        let mut state = self.state.lock().await;
        self.refresh_locked(&mut state).await?;
        match state.broken.values().next() {
            Some(broken) => Err(Error::new(broken.code, broken.message.clone())),
            None => Ok(()),
        }
    }

    /// The partitions whose chain is broken (or could not be read) past its verified prefix, with the error,
    /// as of the last refresh.
    pub async fn broken_chains(&self) -> Vec<(i32, String)> {
        let state = self.state.lock().await;
        state
            .broken
            .iter()
            .map(|(partition, broken)| (*partition, broken.message.clone()))
            .collect()
    }

    /// The committed files of `tenant`, after a refresh.
    pub async fn tenant_files(&self, tenant: &str) -> Result<Vec<Arc<ManifestFile>>> {
        let mut state = self.state.lock().await;
        self.refresh_locked(&mut state).await?;
        state.check_tenant(tenant)?;
        Ok(state
            .files_by_tenant
            .get(tenant)
            .map(|files| files.iter().map(|file| file.file.clone()).collect())
            .unwrap_or_default())
    }

    /// The committed files of `tenant` that may hold events of `conversation` in `range`, after a refresh:
    /// files whose conversation digests name the conversation and whose event times overlap the range.
    pub async fn conversation_files(
        &self,
        tenant: &str,
        conversation: &str,
        range: TimeRange,
    ) -> Result<Vec<Arc<ManifestFile>>> {
        Ok(self
            .conversation_selection(tenant, conversation, range)
            .await?
            .files)
    }

    /// [`ArchiveIndex::conversation_files`] with how far the transparency log vouches for them.
    pub async fn conversation_selection(
        &self,
        tenant: &str,
        conversation: &str,
        range: TimeRange,
    ) -> Result<Selection> {
        let digest = conversation_digest(tenant, conversation);
        let mut state = self.state.lock().await;
        self.refresh_locked(&mut state).await?;
        state.check_tenant(tenant)?;
        let selected: Vec<&IndexedFile> = state
            .files_by_tenant
            .get(tenant)
            .map(|files| {
                files
                    .iter()
                    .filter(|indexed| {
                        // Digests are written sorted, but a linear scan keeps this correct for any writer.
                        indexed.file.conversation_digests.contains(&digest)
                            && range.overlaps(
                                indexed.file.min_occurred_micros,
                                indexed.file.max_occurred_micros,
                            )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let coverage = self.coverage(&state, &selected);
        Ok(Selection {
            files: selected
                .iter()
                .map(|indexed| indexed.file.clone())
                .collect(),
            locations: selected
                .iter()
                .map(|indexed| (indexed.partition, indexed.seq))
                .collect(),
            coverage,
        })
    }

    /// The newest checkpoint (signed note) as of the last refresh, and for each manifest of `manifests`
    /// ((partition, seq) of this index's topic, all covered by it) its leaf index in the log and inclusion
    /// proof. Loads the log's bundles not loaded yet, and checks that their leaves reproduce the checkpoint.
    pub async fn log_proofs(
        &self,
        manifests: &[(i32, u64)],
    ) -> Result<(String, Vec<(u64, Vec<Hash>)>)> {
        let mut state = self.state.lock().await;
        let log = &mut state.log;
        let Some((note, tree_size, root)) = log.checkpoint.clone() else {
            return Err(Error::new(
                ErrorCode::Unavailable,
                "no checkpoint of the transparency log is signed yet",
            ));
        };
        let through = log.cursor.as_ref().map_or(0, |cursor| cursor.next_seq);
        let reader = ChainReader::new(self.chains.store().clone(), LOG_TOPIC);
        while log.leaves_through < through {
            let (manifest, _) = reader.read(LOG_PARTITION, log.leaves_through).await?;
            let bad = |why: String| {
                Error::internal(format!(
                    "the transparency log's entry {} does not verify: {why}",
                    manifest.seq
                ))
            };
            let (bundle_file, _) = log_files(&manifest).map_err(bad)?;
            let bytes = fetch_committed(self.chains.store().as_ref(), bundle_file)
                .await?
                .map_err(bad)?;
            let bundle: Bundle = serde_json::from_slice(&bytes)
                .map_err(|error| bad(format!("its bundle is not valid JSON: {error}")))?;
            if bundle.first_index != log.leaves.len() as u64 {
                return Err(bad(format!(
                    "its bundle starts at leaf {}, the log before it has {}",
                    bundle.first_index,
                    log.leaves.len()
                )));
            }
            for leaf in &bundle.leaves {
                if leaf.topic == self.chains.topic() {
                    log.leaf_of
                        .insert((leaf.partition, leaf.seq), log.leaves.len() as u64);
                }
                log.leaves.push(leaf.hash());
            }
            log.leaves_through += 1;
        }
        if log.leaves.len() as u64 != tree_size || merkle::root(&log.leaves) != root {
            return Err(Error::internal(format!(
                "the transparency log's bundles ({} leaves) do not reproduce its newest checkpoint ({tree_size})",
                log.leaves.len()
            )));
        }
        let proofs = manifests
            .iter()
            .map(|&(partition, seq)| {
                let index = *log.leaf_of.get(&(partition, seq)).ok_or_else(|| {
                    Error::internal(format!(
                        "manifest {seq} of partition {partition} is not in the transparency log"
                    ))
                })?;
                let proof = inclusion_proof(log.leaves.as_slice(), index, tree_size)
                    .ok_or_else(|| Error::internal("no inclusion proof in the log's tree"))?;
                Ok((index, proof))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((note, proofs))
    }

    fn coverage(&self, state: &IndexState, files: &[&IndexedFile]) -> Coverage {
        if self.trusted_keys.is_empty() {
            return Coverage::NotChecked;
        }
        let Some((note, tree_size, _)) = &state.log.checkpoint else {
            return Coverage::NoCheckpoint;
        };
        let covered_files = files
            .iter()
            .filter(|indexed| {
                state
                    .log
                    .covered
                    .get(&indexed.partition)
                    .is_some_and(|covered| indexed.seq < *covered)
            })
            .count() as u64;
        Coverage::Checkpoint {
            note: note.clone(),
            tree_size: *tree_size,
            covered_files,
            uncovered_files: files.len() as u64 - covered_files,
        }
    }

    /// Reads the log's entries since the last refresh and, when there are new ones, its newest checkpoint,
    /// verified with the trusted keys. Called before the chains are read.
    async fn refresh_log(&self, log: &mut LogView) {
        let reader = ChainReader::new(self.chains.store().clone(), LOG_TOPIC);
        let from = log.cursor.clone().unwrap_or_else(ChainHead::empty);
        let verified = reader.read_after(LOG_PARTITION, &from).await;
        if let Some(error) = verified.error {
            if log.error.is_none() {
                tracing::error!(%error, "the transparency log's chain does not verify; nothing is served");
            }
            log.error = Some(format!(
                "the transparency log's chain does not verify: {}",
                error.message()
            ));
            return;
        }
        let Some((_, head)) = verified.manifests.last() else {
            return; // nothing new
        };
        let head = head.clone();
        let state = match newest_log_state(self.chains.store(), &head, &self.trusted_keys).await {
            Ok(state) => state,
            Err(error) => {
                tracing::error!(%error, "the transparency log's newest checkpoint does not verify with \
                    integrity.trusted_keys; nothing is served");
                log.error = Some(error.message().to_string());
                return;
            }
        };
        let Some(note) = state.checkpoint_note else {
            return;
        };
        let topic = self.chains.topic();
        log.logged = state
            .heads
            .iter()
            .filter(|((logged_topic, _), _)| logged_topic == topic)
            .map(|((_, partition), head)| (*partition, (head.next_seq, head.last_sha256.clone())))
            .collect();
        log.checkpoint = Some((note, state.frontier.size(), state.frontier.root()));
        log.cursor = Some(head);
        log.error = None;
    }

    /// Compares what the newest checkpoint logged with the verified chains (see the module documentation).
    fn compare_with_log(&self, state: &mut IndexState) {
        let IndexState {
            manifest_shas,
            broken,
            log,
            ..
        } = state;
        log.covered.clear();
        log.contradicted.clear();
        let Some((_, tree_size, _)) = &log.checkpoint else {
            return;
        };
        for (partition, (next_seq, sha256)) in &log.logged {
            let Some(last) = next_seq.checked_sub(1) else {
                continue;
            };
            let verified = manifest_shas
                .get(partition)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let contradiction = match verified.get(last as usize) {
                Some(held) if held == sha256 => None,
                Some(_) => Some(format!(
                    "manifest {last} is not the one checkpoint {tree_size} of the transparency log covers (it was replaced)"
                )),
                // A broken chain already fails its tenants, with the break's own error.
                None if broken.contains_key(partition) => None,
                None => Some(format!(
                    "checkpoint {tree_size} of the transparency log covers manifests 0 to {last}, but the chain ends \
                     after {} (manifests were removed)",
                    verified.len()
                )),
            };
            match contradiction {
                Some(detail) => {
                    let message = format!("partition {partition}: {detail}");
                    if !log.contradicted.contains_key(partition) {
                        tracing::error!(partition, %message, "the archive contradicts the transparency log");
                    }
                    log.contradicted.insert(
                        *partition,
                        BrokenChain {
                            code: ErrorCode::Internal,
                            message,
                        },
                    );
                }
                None => {
                    log.covered.insert(*partition, *next_seq);
                }
            }
        }
    }

    async fn refresh_locked(&self, state: &mut IndexState) -> Result<()> {
        let check_log = !self.trusted_keys.is_empty();
        if check_log {
            self.refresh_log(&mut state.log).await;
        }
        let partitions: Vec<(i32, ChainHead)> = self
            .chains
            .partitions()
            .await?
            .into_iter()
            .map(|partition| {
                let cursor = state.cursors.get(&partition).cloned();
                (partition, cursor.unwrap_or_else(ChainHead::empty))
            })
            .collect();
        // Chains are independent: read several at once (one listing each, then their new manifests).
        let mut progress = futures::stream::iter(partitions)
            .map(|(partition, cursor)| async move {
                (partition, self.chains.read_after(partition, &cursor).await)
            })
            .buffered(PARTITIONS_READ_AT_ONCE);
        while let Some((partition, verified)) = progress.next().await {
            self.manifests_read
                .fetch_add(verified.manifests.len() as u64, Ordering::Relaxed);
            // Keep every verified manifest, even when the chain breaks after it: the verified prefix is not
            // read again, and the break itself is reported on every refresh until it is repaired.
            let mut error = verified.error;
            for (manifest, cursor) in verified.manifests {
                // A rewrite commit replaces files of earlier manifests: they leave the index. One that names
                // what the chain does not hold live breaks the chain there (it is read again next time).
                match state.live.entry(partition).or_default().apply(&manifest) {
                    Ok(superseded) => {
                        let mut by_tenant: HashMap<String, HashSet<String>> = HashMap::new();
                        for (path, tenant) in superseded {
                            by_tenant.entry(tenant).or_default().insert(path);
                        }
                        for (tenant, paths) in by_tenant {
                            if let Some(files) = state.files_by_tenant.get_mut(&tenant) {
                                files.retain(|indexed| !paths.contains(&indexed.file.path));
                            }
                        }
                    }
                    Err(rewrite) => {
                        error = Some(Error::internal(format!(
                            "manifest chain of topic {} partition {partition} is broken at seq {}: {}",
                            self.chains.topic(),
                            manifest.seq,
                            rewrite.message()
                        )));
                        break;
                    }
                }
                for file in manifest.files {
                    state
                        .tenants_by_partition
                        .entry(partition)
                        .or_default()
                        .insert(file.tenant_id.clone());
                    state
                        .files_by_tenant
                        .entry(file.tenant_id.clone())
                        .or_default()
                        .push(IndexedFile {
                            file: Arc::new(file),
                            partition,
                            seq: manifest.seq,
                        });
                }
                if check_log {
                    state
                        .manifest_shas
                        .entry(partition)
                        .or_default()
                        .push(cursor.last_sha256.clone());
                }
                state.cursors.insert(partition, cursor);
            }
            match error {
                Some(error) => {
                    if !state.broken.contains_key(&partition) {
                        tracing::error!(
                            partition,
                            error = %error,
                            "manifest chain cannot be verified; restores of the tenants it may hold fail \
                             until it is repaired, other tenants are still served"
                        );
                    }
                    state.broken.insert(
                        partition,
                        BrokenChain {
                            code: error.code(),
                            message: error.message().to_string(),
                        },
                    );
                }
                None => {
                    if state.broken.remove(&partition).is_some() {
                        tracing::info!(partition, "manifest chain verifies again");
                    }
                }
            }
        }
        if check_log {
            self.compare_with_log(state);
        }
        Ok(())
    }
}

/// Partitions whose chains are read concurrently during a refresh.
const PARTITIONS_READ_AT_ONCE: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Fixture, event, manifest_for};
    use chatvault_archive::layout;
    use chatvault_archive::manifest::Manifest;
    use chatvault_core::ErrorCode;
    use object_store::{ObjectStoreExt, PutPayload};

    #[test]
    fn time_ranges_treat_zero_as_unbounded_and_the_end_as_exclusive() {
        let range = TimeRange::new(10, 20);
        assert!(range.contains(10) && range.contains(19));
        assert!(!range.contains(9) && !range.contains(20));
        assert!(TimeRange::UNBOUNDED.contains(i64::MIN) && TimeRange::UNBOUNDED.contains(i64::MAX));
        assert!(range.overlaps(0, 10) && range.overlaps(19, 30) && range.overlaps(0, 100));
        assert!(!range.overlaps(0, 9) && !range.overlaps(20, 30));
        assert!(TimeRange::new(10, 0).overlaps(50, 60));
        assert!(TimeRange::new(0, 20).overlaps(-5, -1));
    }

    #[tokio::test]
    async fn refresh_reads_only_new_manifests_and_groups_files_by_tenant() {
        let fixture = Fixture::new().await;
        fixture
            .commit_batch(
                0,
                &[
                    event("acme", "C1", "m1", 1_000),
                    event("acme", "C2", "m2", 2_000),
                ],
            )
            .await;
        fixture
            .commit_batch(0, &[event("globex", "C1", "m3", 3_000)])
            .await;
        let index = ArchiveIndex::new(fixture.store.clone(), &fixture.topic);
        assert_eq!(index.tenant_files("acme").await.expect("acme").len(), 1);
        assert_eq!(index.manifests_read(), 2);
        // Nothing new: nothing is read again.
        index.refresh().await.expect("refresh");
        assert_eq!(index.manifests_read(), 2);
        fixture
            .commit_batch(0, &[event("acme", "C1", "m4", 4_000)])
            .await;
        fixture
            .commit_batch(1, &[event("acme", "C3", "m5", 5_000)])
            .await;
        assert_eq!(index.tenant_files("acme").await.expect("acme").len(), 3);
        assert_eq!(index.tenant_files("globex").await.expect("globex").len(), 1);
        assert!(
            index
                .tenant_files("initech")
                .await
                .expect("none")
                .is_empty()
        );
        assert_eq!(index.manifests_read(), 4);
        let c1 = index
            .conversation_files("acme", "C1", TimeRange::UNBOUNDED)
            .await
            .expect("c1");
        assert_eq!(c1.len(), 2);
        let late = index
            .conversation_files("acme", "C1", TimeRange::new(3_000, 0))
            .await
            .expect("late");
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].min_occurred_micros, 4_000);
    }

    #[tokio::test]
    async fn concurrent_requests_read_each_manifest_once() {
        let fixture = Fixture::new().await;
        for partition in 0..3 {
            for seq in 0..2 {
                let at = 1_000 * (partition * 10 + seq + 1);
                fixture
                    .commit_batch(
                        partition as i32,
                        &[event("acme", "C1", &format!("m{at}"), at)],
                    )
                    .await;
            }
        }
        let index = ArchiveIndex::new(fixture.store.clone(), &fixture.topic);
        let lookups = (0..8).map(|_| index.conversation_files("acme", "C1", TimeRange::UNBOUNDED));
        for files in futures::future::join_all(lookups).await {
            assert_eq!(files.expect("files").len(), 6);
        }
        assert_eq!(index.manifests_read(), 6);
    }

    #[tokio::test]
    async fn a_rewritten_manifest_breaks_the_chain_and_nothing_is_served() {
        let fixture = Fixture::new().await;
        for (index, at) in [1_000, 2_000, 3_000].into_iter().enumerate() {
            fixture
                .commit_batch(0, &[event("acme", "C1", &format!("m{index}"), at)])
                .await;
        }
        // Rewrite manifest 1 (for example to drop its file) without touching its successor.
        let path = layout::manifest_path(&fixture.topic, 0, 1);
        let bytes = fixture
            .store
            .get(&path)
            .await
            .expect("get")
            .bytes()
            .await
            .expect("bytes");
        let mut manifest: Manifest = serde_json::from_slice(&bytes).expect("parse");
        manifest.files.clear();
        fixture
            .store
            .put(
                &path,
                PutPayload::from(serde_json::to_vec_pretty(&manifest).expect("json")),
            )
            .await
            .expect("overwrite");
        let index = ArchiveIndex::new(fixture.store.clone(), &fixture.topic);
        let error = index.tenant_files("acme").await.expect_err("tampered");
        assert_eq!(error.code(), ErrorCode::Internal);
        assert!(error.message().contains("partition 0"), "{error}");
        assert!(error.message().contains("seq 2"), "{error}");
        assert!(error.message().contains("prev_sha256"), "{error}");
        // It keeps failing: the break is not forgotten after the first report.
        assert!(index.tenant_files("acme").await.is_err());
    }

    /// Rewrites manifest `seq` of `partition` with its files removed; returns its original bytes.
    async fn tamper(fixture: &Fixture, partition: i32, seq: u64) -> bytes::Bytes {
        let path = layout::manifest_path(&fixture.topic, partition, seq);
        let original = fixture
            .store
            .get(&path)
            .await
            .expect("get")
            .bytes()
            .await
            .expect("bytes");
        let mut manifest: Manifest = serde_json::from_slice(&original).expect("parse");
        manifest.files.clear();
        manifest.writer_id = "tampered".into();
        fixture
            .store
            .put(
                &path,
                PutPayload::from(serde_json::to_vec_pretty(&manifest).expect("json")),
            )
            .await
            .expect("overwrite");
        original
    }

    #[tokio::test]
    async fn a_broken_chain_fails_only_the_tenants_it_may_hold() {
        let fixture = Fixture::new().await;
        // Partition 0: acme and globex; its manifest 1 is rewritten, so the chain breaks at seq 2.
        for (seq, at) in [1_000, 2_000, 3_000].into_iter().enumerate() {
            fixture
                .commit_batch(0, &[event("acme", "C1", &format!("m{seq}"), at)])
                .await;
        }
        fixture
            .commit_batch(0, &[event("globex", "G1", "g0", 4_000)])
            .await;
        // Partition 1, intact: initech, and more of globex (so globex is affected anyway) and umbrella.
        fixture
            .commit_batch(1, &[event("initech", "I1", "i0", 1_000)])
            .await;
        fixture
            .commit_batch(1, &[event("initech", "I1", "i1", 2_000)])
            .await;
        let original = tamper(&fixture, 0, 1).await;
        let index = ArchiveIndex::new(fixture.store.clone(), &fixture.topic);

        let error = index
            .conversation_files("acme", "C1", TimeRange::UNBOUNDED)
            .await
            .expect_err("acme has files in partition 0's verified prefix");
        assert_eq!(error.code(), ErrorCode::Internal);
        let message = error.message();
        assert!(message.contains("tenant acme"), "{message}");
        assert!(message.contains("partition 0"), "{message}");
        assert!(message.contains("seq 2"), "{message}");
        assert!(index.tenant_files("acme").await.is_err());

        // Tenants of the intact chain are served in full.
        let initech = index.tenant_files("initech").await.expect("initech");
        assert_eq!(initech.len(), 2);
        // globex's only file in partition 0 is past the break: nothing of globex is verified there, so it is
        // served (the documented uncertainty), without the file.
        assert!(
            index
                .tenant_files("globex")
                .await
                .expect("globex")
                .is_empty()
        );
        assert!(
            index
                .tenant_files("nobody")
                .await
                .expect("nobody")
                .is_empty()
        );
        let broken = index.broken_chains().await;
        assert_eq!(broken.len(), 1);
        assert_eq!(broken[0].0, 0);
        // The whole-archive check still reports the break.
        assert!(index.refresh().await.is_err());

        // Repaired: the original manifest back, everything is served again, read from the verified prefix on.
        fixture
            .store
            .put(
                &layout::manifest_path(&fixture.topic, 0, 1),
                PutPayload::from(original),
            )
            .await
            .expect("repair");
        // The tampered manifest 1 was accepted as verified (its link to manifest 0 holds; only its successor
        // shows the change), so a new index is needed to see its original files.
        let index = ArchiveIndex::new(fixture.store.clone(), &fixture.topic);
        assert_eq!(index.tenant_files("acme").await.expect("acme").len(), 3);
        assert_eq!(index.tenant_files("globex").await.expect("globex").len(), 1);
        assert!(index.broken_chains().await.is_empty());
        index.refresh().await.expect("intact");
    }

    #[tokio::test]
    async fn a_chain_broken_at_its_first_manifest_fails_every_tenant() {
        let fixture = Fixture::new().await;
        fixture
            .commit_batch(0, &[event("acme", "C1", "m0", 1_000)])
            .await;
        fixture
            .commit_batch(1, &[event("globex", "G1", "g0", 1_000)])
            .await;
        fixture
            .commit_batch(1, &[event("globex", "G1", "g1", 2_000)])
            .await;
        // Partition 1 now starts at seq 1: nothing of it can be verified.
        fixture
            .store
            .delete(&layout::manifest_path(&fixture.topic, 1, 0))
            .await
            .expect("delete");
        let index = ArchiveIndex::new(fixture.store.clone(), &fixture.topic);
        for tenant in ["acme", "globex", "nobody"] {
            let error = index
                .tenant_files(tenant)
                .await
                .expect_err("unknown partition");
            assert_eq!(error.code(), ErrorCode::Internal);
            assert!(error.message().contains("partition 1"), "{error}");
        }
    }

    #[tokio::test]
    async fn a_removed_manifest_or_an_offset_gap_breaks_the_chain() {
        let fixture = Fixture::new().await;
        for (index, at) in [1_000, 2_000, 3_000].into_iter().enumerate() {
            fixture
                .commit_batch(0, &[event("acme", "C1", &format!("m{index}"), at)])
                .await;
        }
        fixture
            .store
            .delete(&layout::manifest_path(&fixture.topic, 0, 1))
            .await
            .expect("delete");
        let index = ArchiveIndex::new(fixture.store.clone(), &fixture.topic);
        let error = index.refresh().await.expect_err("removed");
        assert!(
            error.message().contains("seq 2") && error.message().contains("missing"),
            "{error}"
        );

        // A manifest whose hash link is right but whose offsets skip records.
        let fixture = Fixture::new().await;
        let (first, sha) = fixture
            .commit_batch(2, &[event("acme", "C1", "m1", 1_000)])
            .await;
        let mut skipping = manifest_for(&fixture.topic, 2, 1, first.end_offset + 5, &sha);
        skipping.end_offset = skipping.start_offset + 1;
        fixture.chain().commit(&skipping).await.expect("commit");
        let index = ArchiveIndex::new(fixture.store.clone(), &fixture.topic);
        let error = index.refresh().await.expect_err("gap");
        assert!(error.message().contains("partition 2"), "{error}");
        assert!(
            error.message().contains("seq 1") && error.message().contains("offset"),
            "{error}"
        );
    }
}

#[cfg(test)]
mod log_tests {
    use super::*;
    use crate::testing::{Fixture, event};
    use chatvault_archive::file::sha256_hex;
    use chatvault_archive::layout;
    use chatvault_archive::manifest::Manifest;
    use chatvault_archive::tlog::note::{NoteSigner, SigningKey};
    use chatvault_archive::tlog::{Committer, Round};
    use object_store::{ObjectStoreExt, PutPayload};

    fn keys() -> (SigningKey, VerifierKey) {
        let (signing, _) = SigningKey::generate("chatvault.test/index").expect("key");
        let verifier = VerifierKey::parse(&signing.verifier_key()).expect("verifier");
        (signing, verifier)
    }

    async fn sign(fixture: &Fixture, key: SigningKey) {
        let committer =
            Committer::new(fixture.store.clone(), Arc::new(key), "test", None).expect("committer");
        let round = committer.run_once().await.expect("round");
        assert!(matches!(round, Round::Signed { .. }), "{round:?}");
    }

    /// Clears the files of manifest `seq` of `partition` and re-links every later manifest to it, so the
    /// chain verifies link by link (what an attacker with write access would do).
    async fn rewrite_from(fixture: &Fixture, partition: i32, seq: u64) {
        let mut prev: Option<String> = None;
        for seq in seq.. {
            let path = layout::manifest_path(&fixture.topic, partition, seq);
            let Ok(got) = fixture.store.get(&path).await else {
                return;
            };
            let mut manifest: Manifest =
                serde_json::from_slice(&got.bytes().await.expect("bytes")).expect("parse");
            match &prev {
                None => manifest.files.clear(),
                Some(sha) => manifest.prev_sha256 = sha.clone(),
            }
            let bytes = serde_json::to_vec_pretty(&manifest).expect("json");
            prev = Some(sha256_hex(&bytes));
            fixture
                .store
                .put(&path, PutPayload::from(bytes))
                .await
                .expect("put");
        }
    }

    async fn coverage(index: &ArchiveIndex, tenant: &str) -> Result<Coverage> {
        Ok(index
            .conversation_selection(tenant, "C1", TimeRange::UNBOUNDED)
            .await?
            .coverage)
    }

    #[tokio::test]
    async fn restores_say_how_far_the_newest_checkpoint_covers_them() {
        let fixture = Fixture::new().await;
        let (signing, verifier) = keys();
        let index = ArchiveIndex::new(fixture.store.clone(), &fixture.topic)
            .with_trusted_keys(vec![verifier.clone()]);
        let untrusting = ArchiveIndex::new(fixture.store.clone(), &fixture.topic);
        for at in [1_000, 2_000] {
            fixture
                .commit_batch(0, &[event("acme", "C1", &format!("m{at}"), at)])
                .await;
        }
        assert_eq!(
            coverage(&index, "acme").await.expect("ok"),
            Coverage::NoCheckpoint
        );
        sign(&fixture, signing).await;
        fixture
            .commit_batch(0, &[event("acme", "C1", "m3", 3_000)])
            .await;
        let Coverage::Checkpoint {
            note,
            tree_size,
            covered_files,
            uncovered_files,
        } = coverage(&index, "acme").await.expect("ok")
        else {
            panic!("no checkpoint");
        };
        assert_eq!((tree_size, covered_files, uncovered_files), (2, 2, 1));
        assert!(note.starts_with("chatvault.test/index\n2\n"), "{note}");
        assert_eq!(
            coverage(&untrusting, "acme").await.expect("ok"),
            Coverage::NotChecked
        );
    }

    #[tokio::test]
    async fn data_a_checkpoint_contradicts_is_refused_to_the_tenants_it_may_hold() {
        let fixture = Fixture::new().await;
        let (signing, verifier) = keys();
        for seq in 0..3 {
            let at = 1_000 * (seq + 1);
            fixture
                .commit_batch(0, &[event("acme", "C1", &format!("m{seq}"), at)])
                .await;
            fixture
                .commit_batch(1, &[event("globex", "C1", &format!("g{seq}"), at)])
                .await;
        }
        sign(&fixture, signing).await;
        // A covered manifest replaced and the chain re-linked after it: every link verifies, the log does not.
        rewrite_from(&fixture, 0, 1).await;
        let index = ArchiveIndex::new(fixture.store.clone(), &fixture.topic)
            .with_trusted_keys(vec![verifier.clone()]);
        let error = coverage(&index, "acme").await.expect_err("contradicted");
        assert_eq!(error.code(), ErrorCode::Internal);
        assert!(
            error.message().contains("partition 0")
                && error
                    .message()
                    .contains("manifest 2 is not the one checkpoint 6"),
            "{error}"
        );
        // Partition 1 is intact: its tenant is served, fully covered.
        let Coverage::Checkpoint {
            uncovered_files, ..
        } = coverage(&index, "globex").await.expect("globex")
        else {
            panic!("no checkpoint");
        };
        assert_eq!(uncovered_files, 0);
        // Without trusted keys the rewrite goes unnoticed: that is what the log is for.
        let blind = ArchiveIndex::new(fixture.store.clone(), &fixture.topic);
        assert!(coverage(&blind, "acme").await.is_ok());

        // The newest covered manifests removed: the chain verifies but ends early.
        let fixture2 = Fixture::new().await;
        let (signing, verifier) = keys();
        for seq in 0..3 {
            fixture2
                .commit_batch(0, &[event("acme", "C1", &format!("m{seq}"), 1_000 + seq)])
                .await;
        }
        sign(&fixture2, signing).await;
        for seq in [1, 2] {
            fixture2
                .store
                .delete(&layout::manifest_path(&fixture2.topic, 0, seq))
                .await
                .expect("delete");
        }
        let index = ArchiveIndex::new(fixture2.store.clone(), &fixture2.topic)
            .with_trusted_keys(vec![verifier]);
        let error = coverage(&index, "acme").await.expect_err("truncated");
        assert!(
            error
                .message()
                .contains("covers manifests 0 to 2, but the chain ends after 1"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_checkpoint_no_trusted_key_signed_fails_every_request() {
        let fixture = Fixture::new().await;
        let (signing, _) = keys();
        let (_, other) = keys();
        fixture
            .commit_batch(0, &[event("acme", "C1", "m1", 1_000)])
            .await;
        sign(&fixture, signing).await;
        let index =
            ArchiveIndex::new(fixture.store.clone(), &fixture.topic).with_trusted_keys(vec![other]);
        let error = coverage(&index, "acme").await.expect_err("untrusted");
        assert!(
            error.message().contains("is not served")
                && error.message().contains("transparency log"),
            "{error}"
        );
        assert!(index.tenant_files("globex").await.is_err());
    }
}
