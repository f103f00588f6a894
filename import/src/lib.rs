//! Back-fill: chat history from the platforms' exports, delivered through the ingest gateway.
//!
//! An importer is a [`Source`] (an export read as an ordered list of named units: a Slack day file, a run of
//! Mattermost lines, a Teams user's chats through Microsoft Graph, read page by page) driven by [`run`], which sends each unit's events to the [`gateway::Gateway`] and marks
//! the unit in the [`checkpoint::Checkpoint`] once all of them were acknowledged. Importers never decide event
//! ids: the gateway derives them from the platform's own ids exactly as for live capture (see
//! `chatvault_core::event::derive_event_id`), so a message captured by webhook and imported later is one
//! archived event, and re-running an import adds nothing.

pub mod checkpoint;
pub mod gateway;
pub mod mattermost;
pub mod slack_export;
pub mod teams;

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use chatvault_core::error::Result;
use chatvault_core::event::{derive_event_id, kind_name};
use chatvault_proto::v1::ChatEvent;
use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::gateway::Gateway;

/// Most derived ids [`run`] remembers to skip repeats within a run (about 100 MB).
const MAX_REMEMBERED_IDS: usize = 2_000_000;

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

/// A part of a unit and where the rest of the unit starts.
#[derive(Debug, Default)]
pub struct Part {
    pub unit: Unit,
    /// Where the unit goes on (an API's next page), kept in the checkpoint once this part is acknowledged;
    /// `None` when the unit is complete.
    pub next: Option<String>,
}

/// The future of [`Source::read`].
pub type PartFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Part>> + 'a>>;

/// An export (or an export API) read as units.
pub trait Source {
    /// `slack-export`, ...: names the checkpoint's source.
    fn kind(&self) -> &'static str;
    /// Identifies what is imported: SHA-256 (hex) of an export file, or of an API import's fixed parameters.
    fn fingerprint(&self) -> &str;
    /// The units, in import order.
    fn units(&self) -> Vec<String>;
    /// Reads the part of `unit` (one of [`Source::units`]) that starts at `cursor` (`None`: its start). A file
    /// export returns a unit whole; an API returns a page and the cursor of the next.
    fn read<'a>(&'a mut self, unit: &'a str, cursor: Option<String>) -> PartFuture<'a>;
    /// Requests the source itself repeated (an API's throttling and failures).
    fn retries(&self) -> u64 {
        0
    }
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
    /// Calls repeated after a retryable error: the gateway's (overload, unavailability) and the source's (an
    /// API's throttling).
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

/// Imports every unit of `source` that `checkpoint` does not hold yet (a unit with a saved cursor resumes at
/// it), stopping between (or in the middle of) parts when `stop` completes; `progress` is called after each
/// acknowledged part.
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
    // Derived ids sent in this run (16 bytes each): an export that holds an event twice sends it once. Past
    // MAX_REMEMBERED_IDS the set starts over, which bounds memory; a repeat sent then is collapsed by the
    // archive like any retry.
    let mut sent: HashSet<[u8; 16]> = HashSet::new();
    tokio::pin!(stop);
    'units: for name in &units {
        if checkpoint.is_done(name) {
            summary.units_resumed += 1;
            continue;
        }
        let mut cursor = checkpoint.cursor(name).map(str::to_string);
        loop {
            let part = tokio::select! {
                biased;
                () = &mut stop => {
                    summary.interrupted = true;
                    break 'units;
                }
                part = source.read(name, cursor.take()) => part?,
            };
            let unit = part.unit;
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
                if sent.len() >= MAX_REMEMBERED_IDS {
                    sent.clear();
                }
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
                    break 'units;
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
            match part.next {
                Some(next) => {
                    checkpoint.save_cursor(name, &next, delivery.acknowledged)?;
                    cursor = Some(next);
                }
                None => {
                    checkpoint.mark_done(name, delivery.acknowledged)?;
                    summary.units_imported += 1;
                }
            }
            summary.events_imported_total = checkpoint.events_imported();
            progress(&summary);
            if cursor.is_none() {
                break;
            }
        }
    }
    summary.events_imported_total = checkpoint.events_imported();
    summary.retries += source.retries();
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

/// The entry names of a ZIP archive (an error names an entry whose name cannot be decoded).
fn zip_entry_names<R: std::io::Read + std::io::Seek>(
    archive: &zip::ZipArchive<R>,
) -> Result<Vec<String>> {
    archive
        .file_names()
        .map(|name| name.map(|name| name.into_owned()))
        .collect::<std::result::Result<Vec<String>, _>>()
        .map_err(|error| {
            chatvault_core::error::Error::invalid_argument(format!(
                "the archive's entry names cannot be read: {error}"
            ))
        })
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
