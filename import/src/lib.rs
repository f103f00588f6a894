//! Back-fill: chat history from the platforms' exports, delivered through the ingest gateway.
//!
//! An importer is a [`Source`] (an export read as an ordered list of named units: a Slack day file, a run of
//! Mattermost lines) driven by [`run`], which sends each unit's events to the [`gateway::Gateway`] and marks
//! the unit in the [`checkpoint::Checkpoint`] once all of them were acknowledged. Importers never decide event
//! ids: the gateway derives them from the platform's own ids exactly as for live capture (see
//! `chatvault_core::event::derive_event_id`), so a message captured by webhook and imported later is one
//! archived event, and re-running an import adds nothing.

pub mod checkpoint;
pub mod gateway;
pub mod mattermost;
pub mod slack_export;

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use chatvault_core::error::Result;
use chatvault_core::event::{derive_event_id, kind_name};
use chatvault_proto::v1::ChatEvent;
use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::gateway::Gateway;

/// One resumable piece of a source and what it holds.
#[derive(Debug, Default)]
pub struct Unit {
    pub name: String,
    /// In the order they happened within the unit (a message before its edit and reactions).
    pub events: Vec<ChatEvent>,
    /// Items that cannot be archived, with why (no timestamp, not an object, ...).
    pub rejected: Vec<Rejection>,
    /// Items deliberately not archived, by reason (for the summary's counts).
    pub skipped: Vec<String>,
}

/// An item of the source that was not archived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    pub unit: String,
    /// What it is, for a person to find it in the export (`message 1700000000.000100 of C123`, `item 4`).
    pub item: String,
    pub reason: String,
}

/// An export read as units.
pub trait Source {
    /// `slack-export`, ...: names the checkpoint's source.
    fn kind(&self) -> &'static str;
    /// SHA-256 (hex) of the export's content.
    fn fingerprint(&self) -> &str;
    /// The units, in import order.
    fn units(&self) -> Vec<String>;
    /// Reads one unit of [`Source::units`].
    fn read(&mut self, unit: &str) -> Result<Unit>;
}

/// What an import run did, printed at the end (`--json` prints this).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub source: String,
    pub fingerprint: String,
    pub tenant: String,
    pub checkpoint: String,
    pub units_total: usize,
    /// Units an earlier run had already imported.
    pub units_resumed: usize,
    /// Units imported by this run.
    pub units_imported: usize,
    /// Events acknowledged by the gateway in this run.
    pub events_imported: u64,
    /// Events acknowledged over every run of this import (from the checkpoint).
    pub events_imported_total: u64,
    /// Events the source holds more than once (the same derived id): sent once.
    pub duplicates_skipped: u64,
    /// Events archived without their raw payload, which was over the gateway's limit.
    pub raw_payloads_dropped: u64,
    /// Gateway calls repeated after a retryable error (overload, unavailability).
    pub retries: u64,
    /// Items deliberately not archived, counted by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Items that could not be archived, each with its reason.
    pub rejected: Vec<Rejection>,
    /// The run stopped early (Ctrl-C); running it again resumes.
    pub interrupted: bool,
    pub elapsed_seconds: f64,
    pub events_per_second: f64,
}

/// Imports every unit of `source` that `checkpoint` does not hold yet, stopping between (or in the middle of)
/// units when `stop` completes; `progress` is called after each unit.
pub async fn run(
    source: &mut dyn Source,
    tenant: &str,
    gateway: &mut Gateway,
    checkpoint: &mut Checkpoint,
    stop: impl std::future::Future<Output = ()>,
    mut progress: impl FnMut(&Summary),
) -> Result<Summary> {
    let started = Instant::now();
    let units = source.units();
    let mut summary = Summary {
        source: source.kind().into(),
        fingerprint: source.fingerprint().into(),
        tenant: tenant.into(),
        checkpoint: checkpoint.path().display().to_string(),
        units_total: units.len(),
        ..Summary::default()
    };
    // Derived ids sent in this run (16 bytes each): an export that holds an event twice sends it once.
    let mut sent: HashSet<[u8; 16]> = HashSet::new();
    tokio::pin!(stop);
    for name in &units {
        if checkpoint.is_done(name) {
            summary.units_resumed += 1;
            continue;
        }
        let unit = source.read(name)?;
        for reason in unit.skipped {
            *summary.skipped.entry(reason).or_default() += 1;
        }
        summary.rejected.extend(unit.rejected);
        let mut events = Vec::with_capacity(unit.events.len());
        for event in unit.events {
            let id = if event.event_id.is_empty() {
                derive_event_id(&event)
            } else {
                event.event_id.clone()
            };
            if sent.insert(id_key(&id)) {
                events.push(event);
            } else {
                summary.duplicates_skipped += 1;
            }
        }
        let descriptions: Vec<String> = events.iter().map(describe).collect();
        let delivery = tokio::select! {
            biased;
            () = &mut stop => {
                summary.interrupted = true;
                break;
            }
            delivery = gateway.deliver(events) => delivery?,
        };
        summary.events_imported += delivery.acknowledged;
        summary.raw_payloads_dropped += delivery.raw_payloads_dropped;
        summary.retries += delivery.retries;
        summary
            .rejected
            .extend(delivery.refused.into_iter().map(|refused| Rejection {
                unit: name.clone(),
                item: descriptions[refused.index].clone(),
                reason: refused.reason,
            }));
        checkpoint.mark_done(name, delivery.acknowledged)?;
        summary.units_imported += 1;
        summary.events_imported_total = checkpoint.events_imported();
        progress(&summary);
    }
    summary.events_imported_total = checkpoint.events_imported();
    summary.elapsed_seconds = started.elapsed().as_secs_f64();
    if summary.elapsed_seconds > 0.0 {
        summary.events_per_second = summary.events_imported as f64 / summary.elapsed_seconds;
    }
    Ok(summary)
}

fn id_key(id: &str) -> [u8; 16] {
    let digest = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
    let mut key = [0; 16];
    key.copy_from_slice(&digest.as_ref()[..16]);
    key
}

/// `message_created 1700000000.000100 in C123`: an event as a person finds it in the export.
fn describe(event: &ChatEvent) -> String {
    let mut text = kind_name(event.kind).to_string();
    if !event.message_id.is_empty() {
        text.push(' ');
        text.push_str(&event.message_id);
    }
    text.push_str(" in ");
    text.push_str(&event.conversation_id);
    text
}

/// SHA-256 (hex) of everything `reader` yields: the fingerprint of an export file.
pub fn fingerprint(mut reader: impl std::io::Read) -> std::io::Result<String> {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0; 1 << 16];
    loop {
        let read = reader.read(&mut buffer)?;
        if read == 0 {
            return Ok(hex::encode(context.finish().as_ref()));
        }
        context.update(&buffer[..read]);
    }
}
