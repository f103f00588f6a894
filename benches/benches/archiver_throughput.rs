//! Archiver throughput: a backlog of ~500-byte chat messages in the broker (librdkafka's mock cluster,
//! in-process over TCP) → encrypted, zstd Parquet in a local object store, committed through the manifest.
//!
//! `cargo bench -p chatvault-benches --bench archiver_throughput` prints events/s and MB/s, overall and per
//! CPU-second of the process (which includes the mock broker serving the fetches). Median of 3 runs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chatvault_archive::keys::DataKeys;
use chatvault_archiver::ArchiverStats;
use chatvault_archiver::config::ArchiverConfig;
use chatvault_archiver::{Archiver, ArchiverOptions};
use chatvault_benches::{chat_message, machine, median, process_cpu_seconds};
use chatvault_core::config::{KafkaConfig, StorageConfig};
use chatvault_core::event::kafka_key;
use chatvault_core::shutdown;
use chatvault_core::storage::object_store_from_config;
use chatvault_core::time::now_micros;
use prost::Message;
use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const EVENTS: u64 = 300_000;
/// librdkafka's mock broker keeps at most 5 MB per partition (older message sets are dropped), so the backlog
/// is spread over enough partitions to stay whole: 64 × ~2.3 MB.
const PARTITIONS: i32 = 64;
const RUNS: usize = 3;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cluster = MockCluster::new(1)?;
    let brokers = cluster.bootstrap_servers();
    let mut rates = Vec::new();
    let mut megabytes = Vec::new();
    let mut per_cpu = Vec::new();
    let mut output_ratio = Vec::new();
    for run in 0..RUNS {
        let topic = format!("bench-archiver-{run}");
        cluster.create_topic(&topic, PARTITIONS, 1)?;
        cluster.create_topic(&format!("{topic}.dead-letter"), 1, 1)?;
        // The backlog.
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("linger.ms", "20")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .create()?;
        let now = now_micros();
        let mut payload_bytes = 0u64;
        for index in 0..EVENTS {
            let mut event = chat_message("acme", index, now);
            event.event_id = format!("bench-{run}-{index}");
            event.received_at_micros = now;
            let payload = event.encode_to_vec();
            payload_bytes += payload.len() as u64;
            let key = kafka_key(&event.tenant_id, &event.conversation_id);
            loop {
                match producer.send(BaseRecord::to(&topic).key(&key).payload(&payload)) {
                    Ok(()) => break,
                    Err(_) => producer.poll(Duration::from_millis(10)),
                };
            }
        }
        producer.flush(Duration::from_secs(60))?;
        let data_dir = tempfile::tempdir()?;
        let storage = StorageConfig {
            url: format!("file://{}", data_dir.path().join("archive").display()),
            ..Default::default()
        };
        let store = object_store_from_config(&storage)?;
        let keys =
            DataKeys::with_local_keyring(store.clone(), &data_dir.path().join("keyring.json"))?;
        let options = ArchiverOptions {
            kafka: KafkaConfig {
                brokers: brokers.clone(),
                topic: topic.clone(),
                ..Default::default()
            },
            config: ArchiverConfig {
                group_id: format!("bench-{run}"),
                max_batch_age: Duration::from_millis(500),
                ..Default::default()
            },
            writer_id: "bench".into(),
            on_shutdown: Default::default(),
            object_lock: false,
        };
        let stats = Arc::new(ArchiverStats::default());
        let (trigger, shutdown_signal) = shutdown::channel();
        let cpu_before = process_cpu_seconds();
        let started = Instant::now();
        let task_stats = stats.clone();
        let store_for_check = store.clone();
        let task = runtime.spawn(Archiver::run::<chatvault_archive::kind::ChatEvents>(
            options,
            store,
            keys,
            task_stats,
            shutdown_signal,
        ));
        while stats.committed_records.load(Ordering::Relaxed) < EVENTS {
            std::thread::sleep(Duration::from_millis(20));
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(300),
                "archiver did not finish"
            );
        }
        let wall_with_join = started.elapsed().as_secs_f64();
        // Throughput from the first consumed record: the consumer-group join (the mock coordinator waits 3 s
        // for more members) is start-up, not archiving.
        let first_record = stats.first_record_micros.load(Ordering::Relaxed);
        let elapsed = (chatvault_core::time::now_micros() - first_record) as f64 / 1e6;
        let cpu = process_cpu_seconds()
            .zip(cpu_before)
            .map(|(after, before)| after - before);
        trigger.trigger();
        runtime.block_on(task)??;
        let rejected: usize = runtime.block_on(async {
            let log = chatvault_archive::chain::ChainReader::new(store_for_check.clone(), &topic);
            let mut rejected = 0;
            for partition in log.partitions().await? {
                for seq in log.list_seqs(partition, None).await? {
                    let (manifest, _) = log.read(partition, seq).await?;
                    if let Some(first) = manifest.rejected_records.first() {
                        eprintln!("rejected example: {first:?}");
                    }
                    rejected += manifest.rejected_records.len();
                }
            }
            Ok::<_, anyhow::Error>(rejected)
        })?;
        anyhow::ensure!(
            stats.committed_events.load(Ordering::Relaxed) == EVENTS,
            "only {} of {EVENTS} events archived ({rejected} records rejected)",
            stats.committed_events.load(Ordering::Relaxed)
        );
        let rate = EVENTS as f64 / elapsed;
        let mb = payload_bytes as f64 / elapsed / 1e6;
        let written = stats.committed_bytes.load(Ordering::Relaxed) as f64;
        println!(
            "run {run}: {EVENTS} events ({:.1} MB protobuf) archived in {elapsed:.2} s after the first record ({wall_with_join:.2} s with the group join): {rate:.0} events/s, {mb:.1} MB/s; \
             CPU {:.2} s; Parquet written {:.1} MB in {} files; {} events in {} batches",
            payload_bytes as f64 / 1e6,
            cpu.unwrap_or(f64::NAN),
            written / 1e6,
            stats.committed_files.load(Ordering::Relaxed),
            stats.committed_events.load(Ordering::Relaxed),
            stats.committed_batches.load(Ordering::Relaxed),
        );
        rates.push(rate);
        megabytes.push(mb);
        if let Some(cpu) = cpu {
            per_cpu.push(EVENTS as f64 / cpu);
        }
        output_ratio.push(payload_bytes as f64 / written);
    }
    println!("machine: {}", machine());
    println!(
        "archiver: median {:.0} events/s, {:.1} MB/s (wall clock, {PARTITIONS} partitions, mock broker in the same process)",
        median(&mut rates),
        median(&mut megabytes)
    );
    if !per_cpu.is_empty() {
        println!(
            "archiver: median {:.0} events per CPU-second (per core, broker included)",
            median(&mut per_cpu)
        );
    }
    println!(
        "archiver: protobuf-to-encrypted-Parquet size ratio {:.1}x",
        median(&mut output_ratio)
    );
    // The share of that CPU the evidence's event leaves take (a protobuf encoding and a SHA-256 per event,
    // computed while encoding each file): the same events, one thread, 3 runs.
    let now = now_micros();
    let events: Vec<_> = (0..EVENTS).map(|i| chat_message("acme", i, now)).collect();
    let mut leaf_micros = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        let mut sink = 0u8;
        for event in &events {
            sink ^= chatvault_archive::tlog::evidence::event_leaf(event)[0];
        }
        std::hint::black_box(sink);
        leaf_micros.push(started.elapsed().as_secs_f64() * 1e6 / EVENTS as f64);
    }
    let leaf = median(&mut leaf_micros);
    println!(
        "event leaves: median {leaf:.2} µs per event, {:.1}% of the archiver's CPU per event above",
        if per_cpu.is_empty() {
            0.0
        } else {
            leaf * 1e-6 * median(&mut per_cpu) * 100.0
        }
    );
    Ok(())
}
