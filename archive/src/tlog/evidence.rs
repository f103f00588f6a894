//! Evidence for an exported conversation: what a recipient needs to check, without the archive and without
//! chatvault's services, that every exported event was archived as it stands and is covered by a signed
//! checkpoint of the archive's transparency log.
//!
//! **Format** `chatvault-evidence-v1` (a JSON document, [`Evidence`]; `docs/ARCHITECTURE.md` "Evidence"):
//! - `events`: the exported events, each the base64 of its protobuf encoding (`chatvault.v1.ChatEvent`), the
//!   canonical form that is hashed: the *event leaf* is the RFC 9162 leaf hash of
//!   `chatvault-event-v1\n` followed by those bytes ([`event_leaf`]);
//! - `files`: per archive file the events came from, the manifest that commits it (its bytes as stored,
//!   base64), the file's path in it, every event leaf of the conversation's rows in that file, in file order
//!   (their RFC 9162 root is the file's *conversation root*, which the manifest entry lists beside the
//!   conversation's digest in `conversation_roots`), and the manifest's leaf index in the log with its
//!   inclusion proof;
//! - `checkpoint`: the signed checkpoint (C2SP signed note) every inclusion proof leads to.
//!
//! [`verify_evidence`] checks: the checkpoint's signature by a trusted key; each manifest's log leaf
//! (topic, partition, seq, SHA-256 of its bytes) is included in the checkpoint's tree; the manifest commits
//! the file, and the file's conversation root is the root of the given leaves; every exported event's leaf is
//! one of them (each row used at most once). So a changed, added or forged event, or a manifest not in the
//! log, fails. The events of a time-limited export are a subset of the leaves: omissions within the range
//! are visible as leaves no event accounts for ([`EvidenceReport::unexported_rows`]).

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chatvault_proto::v1::ChatEvent;
use prost::Message;
use serde::{Deserialize, Serialize};

use super::Leaf;
use super::merkle::{self, Hash, verify_inclusion};
use super::note::{Checkpoint, VerifierKey, open_note};
use crate::file::{conversation_digest, sha256_hex};
use crate::manifest::Manifest;

pub const EVIDENCE_FORMAT: &str = "chatvault-evidence-v1";

/// The leaf hash of one archived event (see the module documentation).
pub fn event_leaf(event: &ChatEvent) -> Hash {
    let mut data = b"chatvault-event-v1\n".to_vec();
    event.encode(&mut data).expect("a Vec grows as needed");
    merkle::leaf_hash(&data)
}

/// The conversation root of one file: the RFC 9162 root of its rows' event leaves, in file order.
pub fn conversation_root(leaves: &[Hash]) -> String {
    hex::encode(merkle::root(leaves))
}

/// An exported conversation's evidence (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// Always `chatvault-evidence-v1`.
    pub format: String,
    pub tenant_id: String,
    pub conversation_id: String,
    /// The signed checkpoint every inclusion proof leads to.
    pub checkpoint: String,
    /// The exported events: base64 of each one's protobuf encoding.
    pub events: Vec<String>,
    pub files: Vec<FileEvidence>,
}

/// One archive file's part of the evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEvidence {
    /// The manifest committing the file: base64 of its bytes as stored.
    pub manifest: String,
    /// The file's path, as the manifest names it.
    pub path: String,
    /// Hex event leaves of every row of the conversation in the file, in file order.
    pub event_leaves: Vec<String>,
    /// The manifest's leaf index in the log, and its RFC 9162 inclusion proof (hex) in the checkpoint's tree.
    pub leaf_index: u64,
    pub inclusion_proof: Vec<String>,
}

impl FileEvidence {
    pub fn new(
        manifest: &[u8],
        path: &str,
        event_leaves: &[Hash],
        leaf_index: u64,
        inclusion_proof: &[Hash],
    ) -> FileEvidence {
        FileEvidence {
            manifest: BASE64.encode(manifest),
            path: path.to_string(),
            event_leaves: super::hashes_to_hex(event_leaves),
            leaf_index,
            inclusion_proof: super::hashes_to_hex(inclusion_proof),
        }
    }
}

impl Evidence {
    /// The exported events, decoded.
    pub fn decoded_events(&self) -> Result<Vec<ChatEvent>, String> {
        self.events
            .iter()
            .enumerate()
            .map(|(index, text)| {
                let bytes = BASE64
                    .decode(text)
                    .map_err(|error| format!("event {index} is not base64: {error}"))?;
                ChatEvent::decode(bytes.as_slice())
                    .map_err(|error| format!("event {index} is not a ChatEvent: {error}"))
            })
            .collect()
    }

    pub fn encode_event(event: &ChatEvent) -> String {
        BASE64.encode(event.encode_to_vec())
    }
}

/// What [`verify_evidence`] established.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EvidenceReport {
    pub origin: String,
    pub tree_size: u64,
    pub events: u64,
    pub files: u64,
    /// Rows of the conversation in the files that no exported event accounts for (outside an export's time
    /// range, or copies of an exported event).
    pub unexported_rows: u64,
}

/// Checks `evidence` against `trusted` keys (see the module documentation); the error names what fails.
pub fn verify_evidence(
    evidence: &Evidence,
    trusted: &[VerifierKey],
) -> Result<EvidenceReport, String> {
    if evidence.format != EVIDENCE_FORMAT {
        return Err(format!(
            "unknown evidence format {:?} (expected {EVIDENCE_FORMAT})",
            evidence.format
        ));
    }
    if trusted.is_empty() {
        return Err("no trusted verifier key: the checkpoint's signature cannot be checked".into());
    }
    let text = open_note(&evidence.checkpoint, trusted)
        .map_err(|error| format!("the checkpoint: {error}"))?;
    let checkpoint = Checkpoint::parse(text).map_err(|error| error.message().to_string())?;
    let digest = conversation_digest(&evidence.tenant_id, &evidence.conversation_id);
    // Every row leaf of the files, with how many times it may still be claimed by an exported event.
    let mut rows: HashMap<Hash, u64> = HashMap::new();
    for (number, file) in evidence.files.iter().enumerate() {
        let at = |why: String| format!("file {number} ({}): {why}", file.path);
        let manifest_bytes = BASE64
            .decode(&file.manifest)
            .map_err(|error| at(format!("its manifest is not base64: {error}")))?;
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|error| at(format!("its manifest is not valid: {error}")))?;
        let leaf = Leaf {
            topic: manifest.topic.clone(),
            partition: manifest.partition,
            seq: manifest.seq,
            manifest_sha256: sha256_hex(&manifest_bytes),
        };
        let proof = super::hashes_from_hex(&file.inclusion_proof)
            .ok_or_else(|| at("its inclusion proof is not hex hashes".into()))?;
        if !verify_inclusion(
            file.leaf_index,
            checkpoint.size,
            &leaf.hash(),
            &proof,
            &checkpoint.root,
        ) {
            return Err(at(format!(
                "manifest {} of {} partition {} is not leaf {} of the checkpoint's tree (the manifest was \
                 altered, or the proof is wrong)",
                manifest.seq, manifest.topic, manifest.partition, file.leaf_index
            )));
        }
        let entry = manifest
            .files
            .iter()
            .find(|entry| entry.path == file.path)
            .ok_or_else(|| at("its manifest does not commit this file".into()))?;
        if entry.tenant_id != evidence.tenant_id {
            return Err(at(format!(
                "the file belongs to tenant {}, not {}",
                entry.tenant_id, evidence.tenant_id
            )));
        }
        let position = entry
            .conversation_digests
            .iter()
            .position(|held| *held == digest)
            .ok_or_else(|| at("the file holds no row of this conversation".into()))?;
        let committed_root = entry
            .conversation_roots
            .get(position)
            .ok_or_else(|| at("its manifest lists no conversation roots".into()))?;
        let leaves = super::hashes_from_hex(&file.event_leaves)
            .ok_or_else(|| at("its event leaves are not hex hashes".into()))?;
        if conversation_root(&leaves) != *committed_root {
            return Err(at(
                "its event leaves do not reproduce the conversation root the manifest committed"
                    .into(),
            ));
        }
        for leaf in leaves {
            *rows.entry(leaf).or_default() += 1;
        }
    }
    let events = evidence.decoded_events()?;
    for (index, event) in events.iter().enumerate() {
        if event.tenant_id != evidence.tenant_id
            || event.conversation_id != evidence.conversation_id
        {
            return Err(format!(
                "event {index} ({}) is not of conversation {} of tenant {}",
                event.event_id, evidence.conversation_id, evidence.tenant_id
            ));
        }
        match rows.get_mut(&event_leaf(event)) {
            Some(left) if *left > 0 => *left -= 1,
            _ => {
                return Err(format!(
                    "event {index} ({}) is not a row of the archived files: it was altered or added",
                    event.event_id
                ));
            }
        }
    }
    Ok(EvidenceReport {
        origin: checkpoint.origin,
        tree_size: checkpoint.size,
        events: events.len() as u64,
        files: evidence.files.len() as u64,
        unexported_rows: rows.values().sum(),
    })
}
