//! The evidence of a restored conversation ([`chatvault_archive::tlog::evidence`]): its events, and for each
//! archive file they came from the manifest, the conversation's event leaves and the manifest's inclusion
//! proof in the transparency log's newest checkpoint. Only conversations every file of which a checkpoint
//! covers get evidence (the others wait for the next checkpoint); the evidence is verified with the trusted
//! keys before it is handed out, so a restorer never vouches for what a recipient would reject.

use chatvault_archive::file::conversation_digest;
use chatvault_archive::layout;
use chatvault_archive::tlog::evidence::{
    EVIDENCE_FORMAT, Evidence, FileEvidence, conversation_root, event_leaf, verify_evidence,
};
use chatvault_core::{Error, ErrorCode, Result};
use futures::StreamExt;
use object_store::ObjectStoreExt;

use crate::index::{Coverage, TimeRange};
use crate::reader::{Collapsed, Restorer};

impl Restorer {
    /// The evidence of `conversation`'s events in `range` (see the module documentation). Holds the
    /// conversation in memory: conversations beyond the buffer limit's events are refused (TOO_LARGE; narrow
    /// the time range).
    pub async fn conversation_evidence(
        &self,
        tenant: &str,
        conversation: &str,
        range: TimeRange,
    ) -> Result<Evidence> {
        let index = self.index();
        let selection = index
            .conversation_selection(tenant, conversation, range)
            .await?;
        match selection.coverage {
            Coverage::Checkpoint {
                uncovered_files: 0, ..
            } => {}
            Coverage::NotChecked => {
                return Err(Error::invalid_argument(
                    "this restorer checks no transparency log (integrity.trusted_keys is empty): it cannot \
                     give evidence",
                ));
            }
            Coverage::NoCheckpoint => {
                return Err(Error::new(
                    ErrorCode::Unavailable,
                    "no checkpoint of the transparency log is signed yet: retry after the next one",
                ));
            }
            Coverage::Checkpoint {
                uncovered_files, ..
            } => {
                return Err(Error::new(
                    ErrorCode::Unavailable,
                    format!(
                        "{uncovered_files} file(s) of the conversation were committed after the newest checkpoint: \
                         retry after the next one (integrity.checkpoint_interval)"
                    ),
                ));
            }
        }
        let (checkpoint, proofs) = index.log_proofs(&selection.locations).await?;
        let digest = conversation_digest(tenant, conversation);
        let limit = self.buffer_limits().events;
        let mut collapsed = Collapsed::default();
        let mut files = Vec::with_capacity(selection.files.len());
        let mut reads = futures::stream::iter(selection.files.iter().cloned())
            .map(|file| self.read_file(file, tenant, Some(conversation)))
            .buffered(self.read_concurrency());
        let mut position = 0;
        while let Some(events) = reads.next().await {
            let events = events?;
            let file = &selection.files[position];
            let (partition, seq) = selection.locations[position];
            let (leaf_index, proof) = &proofs[position];
            position += 1;
            let leaves: Vec<_> = events
                .iter()
                .map(|event| event_leaf(&event.record))
                .collect();
            let committed = file
                .conversation_digests
                .iter()
                .position(|held| *held == digest)
                .and_then(|at| file.conversation_roots.get(at));
            match committed {
                Some(root) if *root == conversation_root(&leaves) => {}
                Some(_) => {
                    return Err(Error::internal(format!(
                        "archive file {}: its rows of the conversation do not reproduce the conversation root \
                         its manifest committed",
                        file.path
                    )));
                }
                None => {
                    return Err(Error::invalid_argument(format!(
                        "archive file {} was written before manifests carried conversation roots: no evidence \
                         can be given for its rows",
                        file.path
                    )));
                }
            }
            let manifest_path = layout::manifest_path(index.topic(), partition, seq);
            let manifest = self.store().get(&manifest_path).await?.bytes().await?;
            files.push(FileEvidence::new(
                &manifest,
                &file.path,
                &leaves,
                *leaf_index,
                proof,
            ));
            collapsed.add(events, range);
            if collapsed.len() > limit {
                return Err(Error::new(
                    ErrorCode::TooLarge,
                    format!(
                        "the conversation has more than {limit} events in the range, more than one evidence \
                         export holds (restorer.max_buffered_events): narrow the time range"
                    ),
                ));
            }
        }
        let evidence = Evidence {
            format: EVIDENCE_FORMAT.into(),
            tenant_id: tenant.into(),
            conversation_id: conversation.into(),
            checkpoint,
            events: collapsed
                .into_sorted()
                .iter()
                .map(|event| Evidence::encode_event(&event.record))
                .collect(),
            files,
        };
        verify_evidence(&evidence, index.trusted_keys()).map_err(|why| {
            Error::internal(format!(
                "the evidence of the conversation does not verify: {why}"
            ))
        })?;
        Ok(evidence)
    }
}
