//! What the poll thread and the writer share about the partitions this worker owns.
//!
//! `generation` changes whenever the partition's position is re-read from storage (assignment, or a commit
//! conflict). A sealed batch carries the generation it was filled under; the writer drops batches of an older
//! generation instead of committing them. This is only an optimization: correctness rests on the manifest's
//! conditional create, which no stale batch can pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use chatvault_core::archive::manifest::ChainHead;

use crate::batch::OpenBatch;

#[derive(Debug)]
pub struct PartitionState {
    pub generation: u64,
    /// The committed chain head, as last read or advanced by this worker's own commits.
    pub head: ChainHead,
    /// The batch being filled. Its `seq`/`start_offset` continue from the last sealed batch.
    pub open: OpenBatch,
    /// Set by the writer after a commit conflict: the poll thread must seek here and restart the open batch.
    pub resync_to: Option<ChainHead>,
    /// Kafka's offsets fell behind the committed chain (a recreated topic, or records lost by the cluster):
    /// the partition is paused and nothing of it is archived until a restart finds Kafka consistent again.
    pub halted: bool,
    /// Fetches repeated for the current offset gap (see [`crate::gaps`]); back to 0 once a record arrives
    /// where it was expected.
    pub gap_refetches: u32,
}

#[derive(Debug, Default, Clone)]
pub struct SharedPartitions {
    inner: Arc<Mutex<HashMap<i32, PartitionState>>>,
}

impl SharedPartitions {
    pub fn lock(&self) -> MutexGuard<'_, HashMap<i32, PartitionState>> {
        // A panic while holding the lock leaves only batch bookkeeping behind; the manifest chain stays
        // authoritative, so continuing with the inner value is safe.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current generation of `partition`, or `None` when this worker does not own it.
    pub fn generation(&self, partition: i32) -> Option<u64> {
        self.lock().get(&partition).map(|state| state.generation)
    }
}
