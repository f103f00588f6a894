//! The streams the archive holds, and what differs between them.
//!
//! The archive holds two streams, each from its own Kafka topic into its own tree of files and its own
//! manifest chains (`manifests/topic=<topic>/...`), never mixed:
//! - [`ChatEvents`]: `chatvault.v1.ChatEvent`s from `kafka.topic`, under `events/`, encrypted per tenant;
//! - [`AuditTrail`]: `chatvault.v1.AuditRecord`s from `kafka.audit_topic`, under `audit/`, encrypted under the
//!   reserved key scope [`AUDIT_KEY_SCOPE`].
//!
//! Batching, the commit protocol, dead-lettering and verification are the same code for both (the archiver
//! is generic over [`RecordKind`]); a kind says only how its records are checked, which key encrypts them,
//! where their files go and how a file is encoded.

use chatvault_core::event::{is_valid_tenant_id, kafka_key};
use chatvault_core::time::Date;
use chatvault_proto::v1::{AuditRecord, ChatEvent};
use object_store::path::Path;

use crate::Archived;
use crate::file::{EncodedFile, FileOptions};
use crate::governance::locks::LockRules;
use crate::keys::{DataKey, KeyScopes};
use crate::layout;
use chatvault_core::error::Result;
use chatvault_core::object_lock::ObjectLock;

/// What one archived stream holds and how it is stored.
pub trait RecordKind: Send + Sync + 'static {
    /// The protobuf message of the stream's Kafka records.
    type Record: prost::Message
        + Default
        + Clone
        + PartialEq
        + std::fmt::Debug
        + Send
        + Sync
        + 'static;

    /// The message's full name, for rejection reasons (`chatvault.v1.ChatEvent`).
    const MESSAGE: &'static str;

    /// Why a decoded record can never be archived, if it cannot (it is then dead-lettered).
    fn refusal(record: &Self::Record) -> Option<String>;

    /// Who owns the data keys that encrypt the record: its tenant, for chat events ([`AUDIT_KEY_SCOPE`] for
    /// the audit trail).
    fn key_owner(record: &Self::Record) -> &str;

    /// The key scope within the owner (`keys.scopes`; empty: the owner's default scope).
    fn key_scope<'a>(record: &'a Self::Record, scopes: &'a KeyScopes) -> &'a str;

    /// The record's time: it picks the file's date and the data key's month.
    fn time_micros(record: &Self::Record) -> i64;

    /// The record's identity within its key scope: copies of one record within a batch (a retried send
    /// produced twice) are written once.
    fn identity(record: &Self::Record) -> (&str, &str);

    /// The Kafka key a dead-lettered copy of the record is produced with.
    fn kafka_key(record: &Self::Record) -> Vec<u8>;

    /// The path of a batch's `index`th file, holding records of `key_owner`'s `key_scope` on `date`.
    fn file_path(
        key_owner: &str,
        key_scope: &str,
        date: Date,
        partition: i32,
        first_offset: i64,
        batch_id: &str,
        index: usize,
    ) -> Path;

    /// The S3 Object Lock the record asks of the file it is written to (`storage.object_lock`); none by
    /// default (governance::locks says which objects are locked and why).
    fn object_lock(_record: &Self::Record, _rules: &LockRules) -> ObjectLock {
        ObjectLock::default()
    }

    /// Encodes `rows` (all of `key`'s scope) as one encrypted Parquet file, sorting them first.
    fn encode_file(
        rows: &mut [&Archived<Self::Record>],
        key: &DataKey,
        options: &FileOptions,
    ) -> Result<EncodedFile>;
}

/// Chat events: `kafka.topic` into `events/tenant=<tenant>/date=<date>/`, under each tenant's data keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChatEvents;

impl RecordKind for ChatEvents {
    type Record = ChatEvent;
    const MESSAGE: &'static str = "chatvault.v1.ChatEvent";

    fn refusal(event: &ChatEvent) -> Option<String> {
        if event.tenant_id.is_empty() || event.event_id.is_empty() {
            return Some("record lacks tenant_id or event_id".into());
        }
        // A tenant id names storage paths and keys: one the gateway would refuse is never archived.
        if !is_valid_tenant_id(&event.tenant_id) {
            return Some(format!(
                "tenant_id {:?} is not a valid tenant id ([a-z0-9][a-z0-9_-]{{0,63}})",
                event.tenant_id.chars().take(80).collect::<String>()
            ));
        }
        None
    }

    fn key_owner(event: &ChatEvent) -> &str {
        &event.tenant_id
    }

    fn key_scope<'a>(event: &'a ChatEvent, scopes: &'a KeyScopes) -> &'a str {
        scopes.scope_of(
            &event.tenant_id,
            &event.conversation_id,
            &event.workspace_id,
        )
    }

    fn time_micros(event: &ChatEvent) -> i64 {
        event.occurred_at_micros
    }

    /// `(conversation_id, event_id)`: senders number events per conversation, so the same `event_id` in
    /// another conversation is another event.
    fn identity(event: &ChatEvent) -> (&str, &str) {
        (&event.conversation_id, &event.event_id)
    }

    fn kafka_key(event: &ChatEvent) -> Vec<u8> {
        kafka_key(&event.tenant_id, &event.conversation_id)
    }

    fn object_lock(event: &ChatEvent, rules: &LockRules) -> ObjectLock {
        rules.for_event(event)
    }

    fn file_path(
        tenant: &str,
        scope: &str,
        date: Date,
        partition: i32,
        first_offset: i64,
        batch_id: &str,
        index: usize,
    ) -> Path {
        layout::event_file_path(
            tenant,
            scope,
            &date.iso(),
            partition,
            first_offset,
            batch_id,
            index,
        )
    }

    fn encode_file(
        rows: &mut [&Archived<ChatEvent>],
        key: &DataKey,
        options: &FileOptions,
    ) -> Result<EncodedFile> {
        crate::file::encode_file(rows, key, options)
    }
}

/// The key scope of the audit trail's data keys (`keys/tenant=_audit/...`). A leading underscore is not
/// allowed in tenant ids, so no tenant can share it; records name their tenant in a column instead.
///
/// One scope for every record, rather than each record's tenant: a refused call names whatever tenant its
/// caller typed, and a data key (and key-encryption key) per invented tenant name would let anyone grow the
/// keyring. It also keeps the evidence of access when a tenant's own keys are destroyed.
pub const AUDIT_KEY_SCOPE: &str = "_audit";

/// The audit trail: `kafka.audit_topic` into `audit/date=<date>/`, under the [`AUDIT_KEY_SCOPE`] data keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuditTrail;

impl RecordKind for AuditTrail {
    type Record = AuditRecord;
    const MESSAGE: &'static str = "chatvault.v1.AuditRecord";

    fn refusal(record: &AuditRecord) -> Option<String> {
        if record.record_id.is_empty() {
            return Some("audit record lacks record_id".into());
        }
        if record.time_micros <= 0 {
            return Some("audit record lacks time_micros".into());
        }
        None
    }

    fn key_owner(_: &AuditRecord) -> &str {
        AUDIT_KEY_SCOPE
    }

    fn key_scope<'a>(_: &'a AuditRecord, _: &'a KeyScopes) -> &'a str {
        crate::keys::DEFAULT_SCOPE
    }

    fn time_micros(record: &AuditRecord) -> i64 {
        record.time_micros
    }

    fn identity(record: &AuditRecord) -> (&str, &str) {
        (&record.record_id, "")
    }

    fn kafka_key(record: &AuditRecord) -> Vec<u8> {
        record.tenant_id.as_bytes().to_vec()
    }

    fn file_path(
        _: &str,
        _: &str,
        date: Date,
        partition: i32,
        first_offset: i64,
        batch_id: &str,
        index: usize,
    ) -> Path {
        layout::audit_file_path(&date.iso(), partition, first_offset, batch_id, index)
    }

    fn encode_file(
        rows: &mut [&Archived<AuditRecord>],
        key: &DataKey,
        options: &FileOptions,
    ) -> Result<EncodedFile> {
        crate::audit::encode_audit_file(rows, key, options)
    }
}
