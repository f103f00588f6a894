//! The upload stage: what must be in storage (and in the dead-letter topic) before a batch's manifest may be
//! created.

use std::time::Instant;

use chatvault_archive::manifest::PendingIntent;
use chatvault_core::error::{Error, Result};
use chatvault_core::metrics::{KeyValue, metrics};
use chatvault_core::object_lock::ObjectLock;
use chatvault_core::time::now_micros;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, PutOptions, PutPayload};
use tracing::Instrument;

use chatvault_archive::kind::RecordKind;

use crate::batch::SealedBatch;
use crate::crash::crash_point;
use crate::encode::Prepared;
use crate::lane::CommitStages;

impl<K: RecordKind> CommitStages<K> {
    /// Produces the batch's rejected records to the dead-letter topic (once; kept across commit retries).
    async fn dead_letter(&self, batch: &SealedBatch<K>, prepared: &mut Prepared) -> Result<()> {
        if prepared.dead_letters.is_some() {
            return Ok(());
        }
        let mut copies = Vec::with_capacity(prepared.rejected.len());
        for record in &prepared.rejected {
            copies.push(
                self.dead_letters
                    .produce(&self.topic, batch.partition, record)
                    .await?,
            );
        }
        if !copies.is_empty() {
            tracing::warn!(
                partition = batch.partition,
                records = copies.len(),
                "records that can never be archived were produced to the dead-letter topic"
            );
        }
        prepared.dead_letters = Some(copies);
        Ok(())
    }

    /// The upload stage: the dead-letter copies of rejected records (a rejected record is committed only with
    /// its copy), the upload intent (so the files of a batch that never commits are found and removed), then
    /// the files. Repeating it after a failure is harmless: every write is idempotent.
    pub(crate) async fn upload(
        &self,
        batch: &SealedBatch<K>,
        prepared: &mut Prepared,
    ) -> Result<()> {
        self.dead_letter(batch, prepared).await?;
        let (batch_id, files) = (prepared.batch_id.as_str(), &prepared.files);
        self.chain
            .write_intent(
                batch.partition,
                &PendingIntent {
                    batch_id: batch_id.to_string(),
                    seq: batch.seq,
                    writer_id: self.writer_id.clone(),
                    files: files.iter().map(|f| f.path.to_string()).collect(),
                    created_at_micros: now_micros(),
                },
            )
            .await?;
        let to_upload: Vec<(Path, bytes::Bytes, ObjectLock)> = files
            .iter()
            .map(|file| (file.path.clone(), file.bytes.clone(), file.lock))
            .collect();
        let store = self.store.clone();
        let upload_span = tracing::info_span!(
            "archive.upload",
            otel.kind = "client",
            files = files.len(),
            bytes = files.iter().map(|file| file.bytes.len()).sum::<usize>(),
            otel.status_code = tracing::field::Empty,
        );
        let upload_started = Instant::now();
        let uploads =
            futures::stream::iter(to_upload.into_iter().map(move |(path, bytes, lock)| {
                let store = store.clone();
                async move {
                    store
                        .put_opts(
                            &path,
                            PutPayload::from(bytes),
                            lock.put_options(PutOptions::default()),
                        )
                        .await
                        .map_err(|error| Error::from(error).context(format!("uploading {path}")))
                }
            }))
            .buffer_unordered(self.upload_concurrency)
            .collect::<Vec<_>>()
            .instrument(upload_span.clone())
            .await;
        if let Some(Err(error)) = uploads.into_iter().find(|upload| upload.is_err()) {
            upload_span.record("otel.status_code", "ERROR");
            metrics()
                .commit_failures
                .add(1, &[KeyValue::new("reason", "upload")]);
            return Err(error);
        }
        metrics()
            .upload_duration
            .record(upload_started.elapsed().as_secs_f64(), &[]);
        crash_point("after_upload");
        Ok(())
    }
}
