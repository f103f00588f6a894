//! The restorer: authorized reads that rehydrate archived conversations.
//!
//! - [`index`]: the in-memory index of committed files, built from (and verifying) the manifest chains.
//! - [`reader`]: [`Restorer`], which fetches, verifies, decrypts and decodes archive files and collapses
//!   duplicate events.
//! - [`rehydrate`](mod@rehydrate): from events to the conversation as people saw it (pure).
//! - [`render`]: a plain-text transcript of restored items.
//! - [`stream`]: the streaming restore of one conversation with bounded memory (plan, then emit).
//! - [`service`]: the `chatvault.v1.RestoreService` gRPC API with health and reflection, and the
//!   [`AccessRecorder`] seam of the audit trail.

pub mod index;
pub mod reader;
pub mod rehydrate;
pub mod render;
pub mod service;
pub mod stream;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use index::{ArchiveIndex, TimeRange};
pub use reader::Restorer;
pub use rehydrate::{rehydrate, restore_items};
pub use render::render_text;
pub use service::{
    AccessOutcome, AccessRecord, AccessRecorder, RestoreApi, TracingAccessRecorder, serve,
    serve_api,
};
pub use stream::{BufferLimits, ConversationPlan};
