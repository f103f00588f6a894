//! The archive's transparency log: every committed manifest of every stream (chat events, the audit trail)
//! becomes a leaf of one RFC 9162 Merkle tree, and the tree's heads are signed as C2SP checkpoints, so that
//! replacing, removing, reordering or truncating anything a checkpoint covers is detectable by anyone holding
//! the public key, offline (`chatvault verify`).
//!
//! **Format** (stable; `docs/ARCHITECTURE.md` "Transparency log" describes it for third-party verifiers):
//! - leaf `i` is the manifest named by entry `i` of the log, its data the text
//!   `chatvault-leaf-v1\nmanifest\n<topic>\n<partition>\n<seq>\n<SHA-256 hex of the manifest's bytes>\n`
//!   ([`Leaf::data`]);
//! - the log is itself a stream committed through the one commit protocol ([`crate::chain`]), topic
//!   [`LOG_TOPIC`], partition 0: log manifest `s` covers leaves `[start_offset, end_offset)` and commits two
//!   files, a bundle `log/bundles/<first leaf, 20 digits>-<batch>.json` ([`Bundle`]: the new leaves, the
//!   committer's state, the consistency proof from the previous checkpoint) and the checkpoint
//!   `log/checkpoints/<tree size, 20 digits>-<batch>.txt` (a signed note, [`note`]);
//! - per stream partition, leaves appear in manifest order, each manifest exactly once, from seq 0 on.
//!
//! A manifest committed after the newest checkpoint is *not yet covered*: nothing signed vouches for it until
//! the next checkpoint (every `integrity.checkpoint_interval`).

pub mod check;
pub mod committer;
pub mod evidence;
pub mod merkle;
pub mod note;

use std::sync::Arc;

use chatvault_core::config::{IntegrityConfig, Pkcs11Config};
use chatvault_core::error::{Error, Result};
use serde::{Deserialize, Serialize};

pub use check::{LogReport, LogTrust};
pub use committer::{Committer, Round};
use merkle::Hash;

/// The topic name of the log's own chain (`manifests/topic=_log/partition=0/`). Kafka topic names cannot
/// clash: chatvault never consumes a topic of this name, and the log never logs itself.
pub const LOG_TOPIC: &str = "_log";
/// The only partition of the log's chain.
pub const LOG_PARTITION: i32 = 0;
pub const BUNDLE_FORMAT: &str = "chatvault-log-bundle-v1";
/// Where the log's files live.
pub const LOG_ROOT: &str = "log";
pub const BUNDLES_ROOT: &str = "log/bundles";
pub const CHECKPOINTS_ROOT: &str = "log/checkpoints";

/// One leaf of the log: a committed manifest of a stream partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leaf {
    pub topic: String,
    pub partition: i32,
    pub seq: u64,
    /// Lower-case hex SHA-256 of the manifest's bytes as stored.
    pub manifest_sha256: String,
}

impl Leaf {
    /// The leaf's data, as hashed into the tree.
    pub fn data(&self) -> String {
        format!(
            "chatvault-leaf-v1\nmanifest\n{}\n{}\n{}\n{}\n",
            self.topic, self.partition, self.seq, self.manifest_sha256
        )
    }

    pub fn hash(&self) -> Hash {
        merkle::leaf_hash(self.data().as_bytes())
    }
}

/// Where the log stands for one stream partition: the next manifest to log, and the chain head after the
/// last one logged (so the next round verifies the link from it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedHead {
    pub topic: String,
    pub partition: i32,
    pub next_seq: u64,
    pub end_offset: i64,
    pub last_sha256: String,
}

/// A log manifest's bundle: the leaves it appends and the state the next committer continues from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// Always `chatvault-log-bundle-v1`.
    pub format: String,
    pub origin: String,
    /// The index of the first leaf appended (the tree size of the previous checkpoint).
    pub first_index: u64,
    /// The tree size after these leaves (this bundle's checkpoint).
    pub tree_size: u64,
    pub leaves: Vec<Leaf>,
    /// Every stream partition's logged head after these leaves.
    pub heads: Vec<LoggedHead>,
    /// The tree's frontier after these leaves: hex hashes of its complete subtrees, largest first.
    pub frontier: Vec<String>,
    /// The RFC 9162 consistency proof from the tree of `first_index` leaves to this one (hex hashes).
    pub consistency_proof: Vec<String>,
    pub created_at_micros: i64,
}

pub fn bundle_path(first_index: u64, batch_id: &str) -> object_store::path::Path {
    object_store::path::Path::from(format!("{BUNDLES_ROOT}/{first_index:020}-{batch_id}.json"))
}

pub fn checkpoint_path(tree_size: u64, batch_id: &str) -> object_store::path::Path {
    object_store::path::Path::from(format!("{CHECKPOINTS_ROOT}/{tree_size:020}-{batch_id}.txt"))
}

/// The path a witness store keeps a checkpoint of `tree_size` under.
pub fn witness_checkpoint_path(tree_size: u64) -> object_store::path::Path {
    object_store::path::Path::from(format!("{CHECKPOINTS_ROOT}/{tree_size:020}.txt"))
}

/// The checkpoint signer `integrity` configures: the key file at `signing_key_path`, or the key labelled
/// `signing_key_pkcs11_label` on the token of `pkcs11` (`keys.pkcs11`); none when neither is set.
pub fn signer_from_config(
    integrity: &IntegrityConfig,
    pkcs11: &Pkcs11Config,
) -> Result<Option<Arc<dyn note::NoteSigner>>> {
    if let Some(path) = &integrity.signing_key_path {
        return Ok(Some(Arc::new(note::SigningKey::load(path)?)));
    }
    let Some(label) = &integrity.signing_key_pkcs11_label else {
        return Ok(None);
    };
    let origin = integrity.origin.as_deref().ok_or_else(|| {
        Error::invalid_argument("integrity.origin: a key on the HSM needs the log's origin")
    })?;
    let hsm = crate::keys::pkcs11::Pkcs11Hsm::open(pkcs11)?;
    Ok(Some(Arc::new(hsm.note_signer(label, origin)?)))
}

pub(crate) fn hashes_to_hex(hashes: &[Hash]) -> Vec<String> {
    hashes.iter().map(hex::encode).collect()
}

pub(crate) fn hashes_from_hex(hashes: &[String]) -> Option<Vec<Hash>> {
    hashes
        .iter()
        .map(|text| {
            hex::decode(text)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
        })
        .collect()
}
