//! The import checkpoint: which units of a source were acknowledged by the gateway, so that a run stopped by a
//! crash or Ctrl-C resumes where it stopped.
//!
//! A unit is marked done only after every event of it was acknowledged (the gateway answers once Kafka holds
//! them), and the file is replaced atomically (written beside, synced, renamed, directory synced), so a crash
//! at any moment leaves either the old or the new checkpoint. A unit that was sent but not yet marked is sent
//! again on resume; its events carry the same derived ids, so the archive collapses the repeat.
//!
//! The checkpoint names the source (kind, SHA-256 fingerprint) and the tenant it was made for: resuming with
//! another export or tenant is refused rather than silently skipping units that were never imported.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use chatvault_core::error::{Error, Result};
use serde::{Deserialize, Serialize};

const FORMAT: &str = "chatvault-import-checkpoint-v1";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct State {
    format: String,
    /// `slack-export`, `mattermost`, ...
    source: String,
    /// Identifies the source's content (SHA-256 of an export file).
    fingerprint: String,
    tenant: String,
    /// Units whose events were all acknowledged.
    done: BTreeSet<String>,
    /// Events acknowledged over every run.
    events_imported: u64,
    /// Units begun but not done: where each goes on (an API's next page).
    #[serde(default)]
    cursors: BTreeMap<String, String>,
}

/// A checkpoint file (see the module documentation).
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    state: State,
}

impl Checkpoint {
    /// Opens the checkpoint at `path`, or starts an empty one when there is none. Refuses a checkpoint made
    /// for another source, fingerprint or tenant.
    pub fn open(path: &Path, source: &str, fingerprint: &str, tenant: &str) -> Result<Checkpoint> {
        let fresh = State {
            format: FORMAT.into(),
            source: source.into(),
            fingerprint: fingerprint.into(),
            tenant: tenant.into(),
            done: BTreeSet::new(),
            events_imported: 0,
            cursors: BTreeMap::new(),
        };
        let state = match std::fs::read(path) {
            Ok(bytes) => {
                let state: State = serde_json::from_slice(&bytes).map_err(|error| {
                    Error::invalid_argument(format!(
                        "checkpoint {} is not a chatvault import checkpoint: {error}",
                        path.display()
                    ))
                })?;
                if state.format != FORMAT {
                    return Err(Error::invalid_argument(format!(
                        "checkpoint {} has format {:?}, expected {FORMAT:?}",
                        path.display(),
                        state.format
                    )));
                }
                if (&state.source, &state.fingerprint, &state.tenant)
                    != (&fresh.source, &fresh.fingerprint, &fresh.tenant)
                {
                    return Err(Error::invalid_argument(format!(
                        "checkpoint {} belongs to another import ({} {} for tenant {}); this one is {source} {fingerprint} \
                         for tenant {tenant}: pass another --checkpoint, or remove the file to start over",
                        path.display(),
                        state.source,
                        state.fingerprint,
                        state.tenant
                    )));
                }
                state
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => fresh,
            Err(error) => {
                return Err(Error::invalid_argument(format!(
                    "checkpoint {} cannot be read: {error}",
                    path.display()
                )));
            }
        };
        Ok(Checkpoint {
            path: path.to_path_buf(),
            state,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_done(&self, unit: &str) -> bool {
        self.state.done.contains(unit)
    }

    /// Units done so far.
    pub fn units_done(&self) -> usize {
        self.state.done.len()
    }

    /// Events acknowledged over every run of this import.
    pub fn events_imported(&self) -> u64 {
        self.state.events_imported
    }

    /// Where a unit begun by an earlier run goes on.
    pub fn cursor(&self, unit: &str) -> Option<&str> {
        self.state.cursors.get(unit).map(String::as_str)
    }

    /// Records that `unit` goes on at `cursor`, with `events` more acknowledged, durably, before returning.
    pub fn save_cursor(&mut self, unit: &str, cursor: &str, events: u64) -> Result<()> {
        let mut next = self.state.clone();
        next.cursors.insert(unit.to_string(), cursor.to_string());
        next.events_imported += events;
        self.replace(next)
    }

    /// Records `unit` as done with `events` acknowledged, durably, before returning.
    pub fn mark_done(&mut self, unit: &str, events: u64) -> Result<()> {
        let mut next = self.state.clone();
        next.cursors.remove(unit);
        if next.done.insert(unit.to_string()) {
            next.events_imported += events;
        }
        self.replace(next)
    }

    fn replace(&mut self, next: State) -> Result<()> {
        write_atomically(
            &self.path,
            &serde_json::to_vec_pretty(&next).expect("serializable"),
        )
        .map_err(|error| {
            Error::unavailable(format!(
                "checkpoint {} cannot be written: {error}",
                self.path.display()
            ))
        })?;
        self.state = next;
        Ok(())
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".partial");
    let temporary = PathBuf::from(temporary);
    {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    std::fs::File::open(&directory)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_survives_reopening_and_refuses_another_import() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("export.zip.chatvault-import");
        let mut checkpoint = Checkpoint::open(&path, "slack-export", "abc", "acme").expect("new");
        assert!(!checkpoint.is_done("C1/2024-01-01.json"));
        checkpoint
            .save_cursor("C1/2024-01-01.json", "page-2", 2)
            .expect("cursor");
        assert_eq!(
            Checkpoint::open(&path, "slack-export", "abc", "acme")
                .expect("reopen")
                .cursor("C1/2024-01-01.json"),
            Some("page-2")
        );
        checkpoint.mark_done("C1/2024-01-01.json", 3).expect("mark");
        checkpoint
            .mark_done("C1/2024-01-01.json", 5)
            .expect("again");
        let reopened = Checkpoint::open(&path, "slack-export", "abc", "acme").expect("reopen");
        assert!(reopened.is_done("C1/2024-01-01.json"));
        assert_eq!(reopened.cursor("C1/2024-01-01.json"), None);
        assert_eq!((reopened.units_done(), reopened.events_imported()), (1, 5));
        for (source, fingerprint, tenant) in [
            ("slack-export", "other", "acme"),
            ("slack-export", "abc", "globex"),
            ("mattermost", "abc", "acme"),
        ] {
            let error = Checkpoint::open(&path, source, fingerprint, tenant).expect_err("refused");
            assert!(
                error.message().contains("belongs to another import"),
                "{error}"
            );
        }
        std::fs::write(&path, b"not json").expect("write");
        let error = Checkpoint::open(&path, "slack-export", "abc", "acme").expect_err("garbage");
        assert!(
            error
                .message()
                .contains("not a chatvault import checkpoint"),
            "{error}"
        );
    }
}
