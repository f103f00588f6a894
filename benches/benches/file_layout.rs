//! The cost of the archive's page layout: one data page per column chunk with row groups bounded by bytes
//! (what the archiver writes, so DuckDB can decrypt every file) against the Parquet writer's default pages (the
//! layout of files written before it), on the same rows in the same process.
//!
//! `cargo bench -p chatvault-benches --bench file_layout` prints, per workload and layout: file size, encode
//! rate in events per CPU-second (encoding is single-threaded), the p50 of restoring one conversation from the
//! file (row-group selection by statistics, decrypt, decode, filter) and of decoding the whole file, and the
//! most data pages found in one column chunk. Medians of 5 runs.

use std::time::Instant;

use chatvault_archive::ArchivedEvent;
use chatvault_archive::file::{
    FileOptions, PageLayout, data_pages_per_column_chunk, decode_file, encode_file,
};
use chatvault_archive::keys::DataKey;
use chatvault_benches::{chat_message, machine, median, process_cpu_seconds};
use chatvault_proto::v1::ChatEvent;

const ROWS: usize = 50_000;
const RUNS: usize = 5;
const LOOKUPS: usize = 15;

fn key() -> DataKey {
    DataKey {
        tenant_id: "acme".into(),
        scope: String::new(),
        period: "2026-11".into(),
        dek_id: "acme/2026-11/bench".into(),
        key: [7; 32],
    }
}

/// xorshift, so both layouts see the same rows.
struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// Messages of 300-2,000 bytes of random words (about one in seven mostly Chinese), 200 conversations.
fn realistic_rows() -> Vec<ArchivedEvent> {
    const WORDS: &[&str] = &[
        "invoice",
        "deadline",
        "shipment",
        "contract",
        "review",
        "budget",
        "the",
        "a",
        "of",
        "meeting",
        "approve",
        "quarterly",
        "customer",
        "ticket",
        "escalate",
        "合同",
        "发票",
        "会议",
        "审批",
        "客户",
    ];
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    (0..ROWS)
        .map(|index| {
            let len = 300 + rng.below(1_700) as usize;
            let mut text = String::with_capacity(len + 16);
            while text.len() < len {
                text.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
                text.push(' ');
            }
            let mut event = chat_message("acme", index as u64, 1_764_000_000_000_000);
            event.conversation_id = format!("C{:03}", rng.below(200));
            event.event_id = format!("e{index}");
            event.text = text;
            archived(event, index)
        })
        .collect()
}

/// The benchmarks' ~500-byte messages (highly repetitive text), 2,000 conversations.
fn repetitive_rows() -> Vec<ArchivedEvent> {
    (0..ROWS)
        .map(|index| {
            let mut event = chat_message("acme", index as u64, 1_764_000_000_000_000);
            event.event_id = format!("e{index}");
            archived(event, index)
        })
        .collect()
}

fn archived(event: ChatEvent, index: usize) -> ArchivedEvent {
    ArchivedEvent {
        record: event,
        kafka_partition: 0,
        kafka_offset: index as i64,
    }
}

fn max_pages_per_chunk(bytes: &bytes::Bytes) -> usize {
    data_pages_per_column_chunk(bytes.clone(), &key())
        .expect("page index")
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0)
}

fn measure(name: &str, rows: &[ArchivedEvent], options: &FileOptions) {
    let key = key();
    let mut encode_rates = Vec::new();
    let mut lookup_ms = Vec::new();
    let mut full_ms = Vec::new();
    let mut encoded = None;
    for _ in 0..RUNS {
        let mut refs: Vec<&ArchivedEvent> = rows.iter().collect();
        let cpu = process_cpu_seconds().unwrap_or_default();
        let started = Instant::now();
        let file = encode_file(&mut refs, &key, options).expect("encode");
        let seconds = process_cpu_seconds()
            .map(|now| now - cpu)
            .filter(|s| *s > 0.0)
            .unwrap_or_else(|| started.elapsed().as_secs_f64());
        encode_rates.push(rows.len() as f64 / seconds);

        let started = Instant::now();
        let all = decode_file(file.bytes.clone(), &key, None).expect("decode");
        full_ms.push(started.elapsed().as_secs_f64() * 1e3);
        assert_eq!(all.len(), rows.len());
        for lookup in 0..LOOKUPS {
            let conversation = &rows[(lookup * 7_919) % rows.len()].record.conversation_id;
            let started = Instant::now();
            let found = decode_file(file.bytes.clone(), &key, Some(conversation)).expect("decode");
            lookup_ms.push(started.elapsed().as_secs_f64() * 1e3);
            assert!(!found.is_empty());
        }
        encoded = Some(file);
    }
    let file = encoded.expect("runs");
    println!(
        "  {name:<44} {:>8.2} MB {:>10.0} ev/CPU-s {:>9.1} ms {:>9.1} ms {:>6}",
        file.bytes.len() as f64 / 1e6,
        median(&mut encode_rates),
        median(&mut lookup_ms),
        median(&mut full_ms),
        max_pages_per_chunk(&file.bytes),
    );
}

fn main() {
    println!(
        "file layout, {ROWS} rows per file, encrypted zstd-3 ({}), medians of {RUNS} runs",
        machine()
    );
    let today = FileOptions {
        page_layout: PageLayout::WriterDefaultPages,
        ..FileOptions::default()
    };
    for (workload, rows) in [
        ("300-2,000-byte random words", realistic_rows()),
        ("~500-byte repetitive messages", repetitive_rows()),
    ] {
        let text_mb = rows.iter().map(|r| r.record.text.len()).sum::<usize>() as f64 / 1e6;
        println!("{workload} ({text_mb:.1} MB of text):");
        println!(
            "  {:<44} {:>11} {:>19} {:>12} {:>12} {:>6}",
            "layout", "size", "encode", "restore p50", "decode all", "pages"
        );
        measure("writer default pages, 65,536-row groups", &rows, &today);
        for mib in [8, 16, 32] {
            measure(
                &format!("one page per chunk, row groups <= {mib} MiB"),
                &rows,
                &FileOptions {
                    row_group_bytes: mib * 1024 * 1024,
                    ..FileOptions::default()
                },
            );
        }
    }
}
