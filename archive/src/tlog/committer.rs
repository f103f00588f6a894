//! Appends newly committed manifests to the log and signs a checkpoint over them, through the one commit
//! protocol (an upload intent, the bundle and checkpoint files, a conditional create of the next log
//! manifest). Any number of committers may run (one per archiver replica): exactly one wins each log
//! sequence number, the others abandon their round and retry on the next tick.
//!
//! A committer extends only a log it has verified: the newest log manifest's bundle and checkpoint must match
//! the SHA-256 the manifest committed, the checkpoint must carry a valid signature by this committer's key,
//! and the bundle's frontier must reproduce the signed root. Each stream partition is read on from its last
//! logged head with every link checked, so a manifest that does not continue its chain is never logged. The
//! consistency proof from the previous checkpoint is generated and checked before the new one is signed.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::merkle::{Extended, Frontier, Hash, consistency_proof, verify_consistency};
use super::note::{Checkpoint, NoteSigner, VerifierKey, open_note};
use super::{
    BUNDLE_FORMAT, Bundle, LOG_PARTITION, LOG_TOPIC, Leaf, LoggedHead, bundle_path,
    checkpoint_path, hashes_from_hex, hashes_to_hex, witness_checkpoint_path,
};
use crate::chain::{self, ChainReader, ChainWriter};
use crate::file::sha256_hex;
use crate::manifest::{ChainHead, MANIFEST_FORMAT, Manifest, ManifestFile};
use chatvault_core::error::{Error, Result};
use chatvault_core::time::now_micros;

/// Leaves one round appends at most (bounds the round's memory; the rest waits for the next round).
pub const MAX_LEAVES_PER_ROUND: usize = 50_000;

/// How a round ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    /// Nothing new to log; the newest checkpoint covers the tree of this size (0: no checkpoint yet).
    UpToDate { tree_size: u64 },
    /// A checkpoint of `tree_size` leaves (`appended` new) was committed.
    Signed {
        tree_size: u64,
        appended: u64,
        checkpoint: String,
    },
    /// Another committer committed this log sequence number first; nothing was signed.
    Lost,
}

/// The log's state after its newest checkpoint, verified ([`newest_log_state`]).
#[derive(Debug, Clone)]
pub struct LogState {
    /// The log manifest the next round commits.
    pub next_seq: u64,
    pub last_manifest_sha256: String,
    /// The tree of the newest checkpoint (empty when there is none).
    pub frontier: Frontier,
    /// Per stream partition, the chain head after the last manifest the newest checkpoint covers.
    pub heads: BTreeMap<(String, i32), ChainHead>,
    /// The newest checkpoint, as the signed note committed (none before the first round).
    pub checkpoint_note: Option<String>,
}

/// Signs checkpoints over the archive in `store` (see the module documentation).
#[derive(Debug, Clone)]
pub struct Committer {
    store: Arc<dyn ObjectStore>,
    chain: ChainWriter,
    key: Arc<dyn NoteSigner>,
    verifier: VerifierKey,
    writer_id: String,
    witness: Option<Arc<dyn ObjectStore>>,
}

impl Committer {
    /// A committer signing with `key` (a file key or one on an HSM), whose name is the log's origin.
    /// `witness`, when given, is a second store (a bucket with Object Lock) that receives a copy of every
    /// checkpoint.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        key: Arc<dyn NoteSigner>,
        writer_id: &str,
        witness: Option<Arc<dyn ObjectStore>>,
    ) -> Result<Committer> {
        let verifier = VerifierKey::parse(&key.verifier_key())?;
        Ok(Committer {
            chain: ChainWriter::new(store.clone(), LOG_TOPIC),
            store,
            key,
            verifier,
            writer_id: writer_id.to_string(),
            witness,
        })
    }

    pub fn origin(&self) -> &str {
        self.key.name()
    }

    /// One round: log what was committed since the newest checkpoint and sign a checkpoint over it.
    pub async fn run_once(&self) -> Result<Round> {
        let head = self.chain.reader().head(LOG_PARTITION).await?;
        let state =
            newest_log_state(&self.store, &head, std::slice::from_ref(&self.verifier)).await?;
        if let (Some(witness), Some(note)) = (&self.witness, &state.checkpoint_note) {
            self.copy_to_witness(witness.as_ref(), state.frontier.size(), note)
                .await?;
        }
        let (leaves, heads) = self.new_leaves(&state).await?;
        let old_size = state.frontier.size();
        if leaves.is_empty() {
            return Ok(Round::UpToDate {
                tree_size: old_size,
            });
        }
        let hashes: Vec<Hash> = leaves.iter().map(Leaf::hash).collect();
        let proof = consistency_proof(
            &Extended {
                frontier: &state.frontier,
                appended: &hashes,
            },
            old_size,
            old_size + hashes.len() as u64,
        )
        .ok_or_else(|| Error::internal("the log's frontier cannot prove consistency"))?;
        let old_root = state.frontier.root();
        let mut frontier = state.frontier.clone();
        for hash in &hashes {
            frontier.push(*hash);
        }
        let new_root = frontier.root();
        if !verify_consistency(old_size, frontier.size(), &old_root, &new_root, &proof) {
            return Err(Error::internal(
                "refusing to sign a checkpoint that is not consistent with the previous one",
            ));
        }
        let checkpoint = Checkpoint {
            origin: self.origin().to_string(),
            size: frontier.size(),
            root: new_root,
        };
        // An HSM signs over a network round trip: off the async workers.
        let (key, text) = (self.key.clone(), checkpoint.text());
        let note = tokio::task::spawn_blocking(move || key.sign_note(&text))
            .await
            .map_err(|error| Error::internal(format!("signing task failed: {error}")))??;
        let bundle = Bundle {
            format: BUNDLE_FORMAT.into(),
            origin: self.origin().to_string(),
            first_index: old_size,
            tree_size: frontier.size(),
            leaves,
            heads: heads
                .into_iter()
                .map(|((topic, partition), head)| LoggedHead {
                    topic,
                    partition,
                    next_seq: head.next_seq,
                    end_offset: head.end_offset,
                    last_sha256: head.last_sha256,
                })
                .collect(),
            frontier: hashes_to_hex(&frontier.hashes()),
            consistency_proof: hashes_to_hex(&proof),
            created_at_micros: now_micros(),
        };
        let appended = bundle.leaves.len() as u64;
        if !self.commit(&head, &state, bundle, &note).await? {
            return Ok(Round::Lost);
        }
        if let Some(witness) = &self.witness {
            self.copy_to_witness(witness.as_ref(), frontier.size(), &note)
                .await?;
        }
        Ok(Round::Signed {
            tree_size: frontier.size(),
            appended,
            checkpoint: note,
        })
    }

    /// The manifests committed since `state`, each link verified, in (topic, partition, seq) order, and the
    /// logged heads after them.
    async fn new_leaves(
        &self,
        state: &LogState,
    ) -> Result<(Vec<Leaf>, BTreeMap<(String, i32), ChainHead>)> {
        let mut heads = state.heads.clone();
        let mut leaves = Vec::new();
        for topic in chain::topics(self.store.as_ref()).await? {
            if topic == LOG_TOPIC {
                continue;
            }
            let reader = ChainReader::new(self.store.clone(), &topic);
            for partition in reader.partitions().await? {
                if leaves.len() >= MAX_LEAVES_PER_ROUND {
                    return Ok((leaves, heads));
                }
                let key = (topic.clone(), partition);
                let from = heads.get(&key).cloned().unwrap_or_else(ChainHead::empty);
                let verified = reader.read_after(partition, &from).await;
                for (manifest, after) in verified.manifests {
                    leaves.push(Leaf {
                        topic: topic.clone(),
                        partition,
                        seq: manifest.seq,
                        manifest_sha256: after.last_sha256.clone(),
                    });
                    heads.insert(key.clone(), after);
                    if leaves.len() >= MAX_LEAVES_PER_ROUND {
                        break;
                    }
                }
                if let Some(error) = verified.error {
                    // Logged up to the last verified link; the rest waits (and verify names the break).
                    tracing::error!(topic = %topic, partition, %error, "not logging past a manifest that does not verify");
                }
            }
        }
        Ok((leaves, heads))
    }

    /// Commits `bundle` and `note` as the next log manifest; false when another committer won.
    async fn commit(
        &self,
        head: &ChainHead,
        state: &LogState,
        bundle: Bundle,
        note: &str,
    ) -> Result<bool> {
        let batch_id = chatvault_core::random_hex(8)?;
        let bundle_at = bundle_path(bundle.first_index, &batch_id);
        let checkpoint_at = checkpoint_path(bundle.tree_size, &batch_id);
        let bundle_bytes = Bytes::from(serde_json::to_vec_pretty(&bundle)?);
        let note_bytes = Bytes::from(note.as_bytes().to_vec());
        let created = bundle.created_at_micros;
        let describe = |path: &Path, bytes: &Bytes, rows: u64| {
            ManifestFile::plaintext(path, bytes, rows, created)
        };
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            topic: LOG_TOPIC.into(),
            partition: LOG_PARTITION,
            seq: state.next_seq,
            start_offset: bundle.first_index as i64,
            end_offset: bundle.tree_size as i64,
            batch_id: batch_id.clone(),
            writer_id: self.writer_id.clone(),
            created_at_micros: created,
            prev_sha256: state.last_manifest_sha256.clone(),
            files: vec![
                describe(&bundle_at, &bundle_bytes, bundle.leaves.len() as u64),
                describe(&checkpoint_at, &note_bytes, 1),
            ],
            rejected_records: Vec::new(),
            offset_gaps: Vec::new(),
            supersedes: Vec::new(),
        };
        debug_assert_eq!(manifest.seq, head.next_seq);
        self.chain
            .commit_with_files(
                &manifest,
                vec![(bundle_at, bundle_bytes), (checkpoint_at, note_bytes)],
            )
            .await
    }

    /// Puts the checkpoint of `tree_size` into the witness store unless it is there already (a create, so an
    /// Object-Locked bucket accepts it and nothing there is ever overwritten).
    async fn copy_to_witness(
        &self,
        witness: &dyn ObjectStore,
        tree_size: u64,
        note: &str,
    ) -> Result<()> {
        let path = witness_checkpoint_path(tree_size);
        match witness
            .put_opts(
                &path,
                PutPayload::from(note.as_bytes().to_vec()),
                PutOptions::from(PutMode::Create),
            )
            .await
        {
            Ok(_)
            | Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(()),
            Err(error) => {
                Err(Error::from(error).context(format!("copying {path} to the witness store")))
            }
        }
    }
}

/// The bundle and checkpoint entries of a log manifest.
pub fn log_files(
    manifest: &Manifest,
) -> std::result::Result<(&ManifestFile, &ManifestFile), String> {
    let find = |root: &str| {
        manifest
            .files
            .iter()
            .find(|file| file.path.starts_with(root))
    };
    match (find(super::BUNDLES_ROOT), find(super::CHECKPOINTS_ROOT)) {
        (Some(bundle), Some(checkpoint)) if manifest.files.len() == 2 => Ok((bundle, checkpoint)),
        _ => Err(format!(
            "log manifest {} does not name one bundle and one checkpoint",
            manifest.seq
        )),
    }
}

/// A committed file's bytes, once their size and SHA-256 match its manifest entry (`Err` inside says what is
/// wrong with it; the outer error is storage failing).
pub async fn fetch_committed(
    store: &dyn ObjectStore,
    file: &ManifestFile,
) -> Result<std::result::Result<Bytes, String>> {
    let path = Path::from(file.path.as_str());
    let bytes = match store.get(&path).await {
        Ok(found) => found.bytes().await?,
        Err(object_store::Error::NotFound { .. }) => {
            return Ok(Err(format!("{path} is missing")));
        }
        Err(error) => return Err(error.into()),
    };
    if bytes.len() as u64 != file.bytes || sha256_hex(&bytes) != file.sha256 {
        return Ok(Err(format!(
            "{path} is not what its log manifest committed"
        )));
    }
    Ok(Ok(bytes))
}
/// Reads and verifies the log's newest entry, whose chain head is `head`: its bundle and checkpoint must match
/// the SHA-256 the log manifest committed, the checkpoint must carry a valid signature by one of `trusted`,
/// and the bundle's frontier must reproduce the signed root. An empty log is an empty state.
pub async fn newest_log_state(
    store: &Arc<dyn ObjectStore>,
    head: &ChainHead,
    trusted: &[VerifierKey],
) -> Result<LogState> {
    let mut state = LogState {
        next_seq: head.next_seq,
        last_manifest_sha256: head.last_sha256.clone(),
        frontier: Frontier::new(),
        heads: BTreeMap::new(),
        checkpoint_note: None,
    };
    let Some(last) = head.next_seq.checked_sub(1) else {
        return Ok(state);
    };
    let refuse = |why: String| {
        Error::internal(format!(
            "the transparency log's newest entry (log manifest {last}) does not verify: {why} (run \
             chatvault verify)"
        ))
    };
    let (manifest, _) = ChainReader::new(store.clone(), LOG_TOPIC)
        .read(LOG_PARTITION, last)
        .await?;
    let (bundle_file, checkpoint_file) = log_files(&manifest).map_err(refuse)?;
    let bundle_bytes = fetch_committed(store.as_ref(), bundle_file)
        .await?
        .map_err(refuse)?;
    let note_bytes = fetch_committed(store.as_ref(), checkpoint_file)
        .await?
        .map_err(refuse)?;
    let bundle: Bundle = serde_json::from_slice(&bundle_bytes)
        .map_err(|error| refuse(format!("its bundle is not valid JSON: {error}")))?;
    let note = String::from_utf8(note_bytes.to_vec())
        .map_err(|_| refuse("its checkpoint is not UTF-8".into()))?;
    let text =
        open_note(&note, trusted).map_err(|error| refuse(format!("its checkpoint: {error}")))?;
    let checkpoint = Checkpoint::parse(text).map_err(|error| refuse(error.to_string()))?;
    let frontier = hashes_from_hex(&bundle.frontier)
        .and_then(|hashes| Frontier::from_parts(bundle.tree_size, &hashes))
        .ok_or_else(|| refuse("its bundle's frontier is malformed".into()))?;
    if checkpoint.size != bundle.tree_size
        || bundle.tree_size != manifest.end_offset as u64
        || frontier.root() != checkpoint.root
    {
        return Err(refuse(
            "its bundle, checkpoint and manifest disagree on the tree".into(),
        ));
    }
    state.frontier = frontier;
    state.heads = bundle
        .heads
        .into_iter()
        .map(|head| {
            (
                (head.topic, head.partition),
                ChainHead {
                    next_seq: head.next_seq,
                    end_offset: head.end_offset,
                    last_sha256: head.last_sha256,
                },
            )
        })
        .collect();
    state.checkpoint_note = Some(note);
    Ok(state)
}
