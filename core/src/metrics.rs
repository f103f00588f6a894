//! The fixed set of metrics every role records, in one place so the names are a documented contract
//! (docs/OPERATIONS.md lists them with their Prometheus forms).
//!
//! Instruments are created from the global meter provider on first use, so [`crate::telemetry::Telemetry`]
//! must be installed before a role records anything; before that (and in library tests) they are no-ops.
//! Labels stay low-cardinality: a source, a reason, a partition, an outcome; never tenant, user or
//! conversation ids. Prometheus names follow from the OpenTelemetry ones: dots become underscores, the unit
//! is appended (`_seconds`, `_bytes`) and counters end in `_total`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

pub use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};

/// Latency buckets in seconds: 0.5 ms to 1 min.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// File sizes in bytes: 4 KiB to 1 GiB.
const SIZE_BUCKETS: [f64; 10] = [
    4096.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    134217728.0,
    268435456.0,
    1073741824.0,
];
/// Events per batch: 1 to 1M.
const COUNT_BUCKETS: [f64; 8] = [
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 500000.0, 1000000.0,
];

/// Every instrument chatvault records.
pub struct Metrics {
    /// `chatvault.ingest.events.accepted` {source}: events acknowledged by Kafka and answered OK.
    pub events_accepted: Counter<u64>,
    /// `chatvault.ingest.requests.rejected` {source, reason}: requests refused (bad signature, replay,
    /// invalid event, unauthenticated, overload, ...); nothing of them was produced.
    pub requests_rejected: Counter<u64>,
    /// `chatvault.ingest.redeliveries` {source}: webhook retries answered without producing again.
    pub redeliveries: Counter<u64>,
    /// `chatvault.gateway.produce.duration` (s) {outcome}: from enqueueing a request's events to Kafka's
    /// acknowledgement of all of them.
    pub produce_duration: Histogram<f64>,
    /// `chatvault.archiver.events.archived`: events in committed files.
    pub events_archived: Counter<u64>,
    /// `chatvault.archiver.batch.events`: records per committed batch.
    pub batch_events: Histogram<u64>,
    /// `chatvault.archiver.file.size` (By): encrypted Parquet file sizes.
    pub file_size: Histogram<u64>,
    /// `chatvault.archiver.upload.duration` (s): uploading one batch's files.
    pub upload_duration: Histogram<f64>,
    /// `chatvault.archiver.commit.duration` (s): the manifest's conditional create.
    pub commit_duration: Histogram<f64>,
    /// `chatvault.archiver.commit.failures` {reason}: attempts that failed (storage errors, fencing).
    pub commit_failures: Counter<u64>,
    /// `chatvault.keys.provider.duration` (s) {operation}: key-encryption-key provider calls.
    pub key_provider_duration: Histogram<f64>,
    /// `chatvault.keys.provider.errors` {operation}.
    pub key_provider_errors: Counter<u64>,
    /// `chatvault.integrity.checkpoint.rounds` {outcome: signed, up_to_date, lost, failed}: checkpoint rounds
    /// of the transparency log; `failed` ones (storage, or a log that does not verify) need an operator.
    pub checkpoint_rounds: Counter<u64>,
    /// `chatvault.integrity.log.leaves`: manifests appended to the transparency log.
    pub log_leaves: Counter<u64>,
    /// `chatvault.restorer.request.duration` (s) {method, outcome}: from the request until the response is
    /// ready (the conversation read, decrypted and rehydrated); streaming it out is not included.
    pub restore_duration: Histogram<f64>,
    /// Source of `chatvault.archiver.consumer.lag` {topic, partition}: records of each partition this process
    /// owns that are not yet durably archived (an observable gauge reads it). Per topic: the archiver role
    /// consumes the chat events' topic and the audit topic, each with its own consumer.
    consumer_lag: Arc<Mutex<BTreeMap<String, BTreeMap<i32, i64>>>>,
    /// Source of `chatvault.archiver.partitions.halted` {topic}: owned partitions not consumed because
    /// Kafka's offsets fell behind the archive (a recreated topic, or records lost by the cluster).
    halted_partitions: PerTopic,
    /// Source of `chatvault.archiver.partitions.stalled` {topic}: owned partitions with records to archive
    /// that made no progress for `archiver.stall_timeout` (storage, keys or the chain head unreachable, or
    /// retries failing).
    stalled_partitions: PerTopic,
    /// Source of `chatvault.drill.last.timestamp` (s, Unix time the newest restore drill finished) and
    /// `chatvault.drill.last.passed` (1 or 0), read by the restorer from the archive's signed reports.
    last_drill: Arc<Mutex<Option<(f64, bool)>>>,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's instruments.
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(|| Metrics::new(&opentelemetry::global::meter("chatvault")))
}

impl Metrics {
    fn new(meter: &Meter) -> Metrics {
        let latency = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build()
        };
        let consumer_lag: Arc<Mutex<BTreeMap<String, BTreeMap<i32, i64>>>> = Arc::default();
        let observed = consumer_lag.clone();
        meter
            .i64_observable_gauge("chatvault.archiver.consumer.lag")
            .with_description(
                "Records of the partition not yet durably archived (last stable offset minus the manifest chain's end)",
            )
            .with_callback(move |observer| {
                let lag = observed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                for (topic, partitions) in lag.iter() {
                    for (partition, records) in partitions {
                        observer.observe(
                            *records,
                            &[
                                KeyValue::new("topic", topic.clone()),
                                KeyValue::new("partition", *partition as i64),
                            ],
                        );
                    }
                }
            })
            .build();
        let halted_partitions = PerTopic::default();
        let observed = halted_partitions.clone();
        meter
            .u64_observable_gauge("chatvault.archiver.partitions.halted")
            .with_description(
                "Owned partitions not consumed because Kafka's offsets fell behind the archive",
            )
            .with_callback(move |observer| observed.observe_into(observer))
            .build();
        let stalled_partitions = PerTopic::default();
        let observed = stalled_partitions.clone();
        meter
            .u64_observable_gauge("chatvault.archiver.partitions.stalled")
            .with_description(
                "Owned partitions with records to archive and no commit for archiver.stall_timeout",
            )
            .with_callback(move |observer| observed.observe_into(observer))
            .build();
        let last_drill: Arc<Mutex<Option<(f64, bool)>>> = Arc::default();
        let observed = last_drill.clone();
        meter
            .f64_observable_gauge("chatvault.drill.last.timestamp")
            .with_unit("s")
            .with_description("Unix time the newest restore drill in the archive finished")
            .with_callback(move |observer| {
                let last = observed
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if let Some((finished, _)) = *last {
                    observer.observe(finished, &[]);
                }
            })
            .build();
        let observed = last_drill.clone();
        meter
            .u64_observable_gauge("chatvault.drill.last.passed")
            .with_description(
                "Whether the newest restore drill in the archive passed (1) or failed (0)",
            )
            .with_callback(move |observer| {
                let last = observed
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if let Some((_, passed)) = *last {
                    observer.observe(u64::from(passed), &[]);
                }
            })
            .build();
        Metrics {
            events_accepted: meter
                .u64_counter("chatvault.ingest.events.accepted")
                .with_description("Events acknowledged by Kafka and answered OK")
                .build(),
            requests_rejected: meter
                .u64_counter("chatvault.ingest.requests.rejected")
                .with_description("Ingest requests refused, by source and reason")
                .build(),
            redeliveries: meter
                .u64_counter("chatvault.ingest.redeliveries")
                .with_description("Webhook redeliveries answered without producing again")
                .build(),
            produce_duration: latency(
                "chatvault.gateway.produce.duration",
                "Time from enqueueing a request's events to Kafka acknowledging all of them",
            ),
            events_archived: meter
                .u64_counter("chatvault.archiver.events.archived")
                .with_description("Events in committed archive files")
                .build(),
            batch_events: meter
                .u64_histogram("chatvault.archiver.batch.events")
                .with_description("Kafka records per committed batch")
                .with_boundaries(COUNT_BUCKETS.to_vec())
                .build(),
            file_size: meter
                .u64_histogram("chatvault.archiver.file.size")
                .with_unit("By")
                .with_description("Size of each encrypted Parquet file written")
                .with_boundaries(SIZE_BUCKETS.to_vec())
                .build(),
            upload_duration: latency(
                "chatvault.archiver.upload.duration",
                "Uploading one batch's files to object storage",
            ),
            commit_duration: latency(
                "chatvault.archiver.commit.duration",
                "The manifest's conditional create that commits a batch",
            ),
            commit_failures: meter
                .u64_counter("chatvault.archiver.commit.failures")
                .with_description("Batch upload or commit attempts that failed, by reason")
                .build(),
            key_provider_duration: latency(
                "chatvault.keys.provider.duration",
                "Key-encryption-key provider calls (wrap, unwrap)",
            ),
            key_provider_errors: meter
                .u64_counter("chatvault.keys.provider.errors")
                .with_description("Failed key-encryption-key provider calls")
                .build(),
            checkpoint_rounds: meter
                .u64_counter("chatvault.integrity.checkpoint.rounds")
                .with_description("Transparency-log checkpoint rounds, by outcome")
                .build(),
            log_leaves: meter
                .u64_counter("chatvault.integrity.log.leaves")
                .with_description("Manifests appended to the transparency log")
                .build(),
            restore_duration: latency(
                "chatvault.restorer.request.duration",
                "Restorer calls, from the request until the response is ready (conversation rehydrated)",
            ),
            consumer_lag,
            halted_partitions,
            stalled_partitions,
            last_drill,
        }
    }

    /// Records the newest restore drill: when it finished and whether it passed.
    pub fn set_last_drill(&self, finished_at_micros: i64, passed: bool) {
        *self
            .last_drill
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
            Some((finished_at_micros as f64 / 1e6, passed));
    }

    pub fn set_stalled_partitions(&self, topic: &str, count: usize) {
        self.stalled_partitions.set(topic, count as u64);
    }

    pub fn set_halted_partitions(&self, topic: &str, count: usize) {
        self.halted_partitions.set(topic, count as u64);
    }

    /// Replaces the lag of the partitions of `topic` this process owns (partition → records); partitions no
    /// longer owned disappear, since another process reports them now.
    pub fn replace_consumer_lag(&self, topic: &str, lag: BTreeMap<i32, i64>) {
        let mut current = self
            .consumer_lag
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        current.insert(
            topic.to_string(),
            lag.into_iter()
                .map(|(partition, records)| (partition, records.max(0)))
                .collect(),
        );
    }
}

/// A gauge's current value per Kafka topic.
#[derive(Debug, Clone, Default)]
struct PerTopic(Arc<Mutex<BTreeMap<String, u64>>>);

impl PerTopic {
    fn set(&self, topic: &str, value: u64) {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(topic.to_string(), value);
    }

    fn observe_into(&self, observer: &dyn opentelemetry::metrics::AsyncInstrument<u64>) {
        let values = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (topic, value) in values.iter() {
            observer.observe(*value, &[KeyValue::new("topic", topic.clone())]);
        }
    }
}

/// `{source}` as a label.
pub fn source_label(source: &'static str) -> [KeyValue; 1] {
    [KeyValue::new("source", source)]
}

/// `{source, reason}` as labels.
pub fn rejection_labels(source: &'static str, reason: &'static str) -> [KeyValue; 2] {
    [
        KeyValue::new("source", source),
        KeyValue::new("reason", reason),
    ]
}

/// `{outcome}` as a label.
pub fn outcome_label(outcome: &'static str) -> [KeyValue; 1] {
    [KeyValue::new("outcome", outcome)]
}
