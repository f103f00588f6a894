//! A Kafka-protocol proxy in front of a real broker (librdkafka's mock cluster) that can answer fetches wrongly,
//! the way tansu 0.6.0 does: a fetch whose offset lies inside a record batch is answered with the batches
//! *after* that batch, so the client sees offsets jump although the broker still holds them.
//!
//! The proxy forwards every request and response unchanged except four, which it must understand:
//! - `ApiVersions`: it caps `Fetch` and `Metadata` at version 4 and `FindCoordinator` at version 2, the newest
//!   versions without flexible (tagged-field) encoding, so the three responses below have one simple layout;
//! - `Metadata` and `FindCoordinator`: broker addresses are rewritten to the proxy's own listeners (one per
//!   upstream broker), so the client never bypasses it;
//! - `Fetch` (v4): with a [`FetchFault`] set, the client never receives the record batch holding the offset
//!   it asked for, but the batches after it, as from the faulty broker. The proxy learns where batches start
//!   and end from the fetch responses it relays. A fetch from inside a batch it knows is sent upstream from
//!   the offset after that batch; in a response, a batch holding the requested offset is removed (the mock
//!   answers with that one batch only, so the client sees an empty answer and asks again, now from a known
//!   batch).
//!
//! Anything it cannot parse is forwarded as it came. [`KafkaProxy::skipped_batches`] counts the batches
//! removed, so a test can prove the fault really happened.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const FETCH: i16 = 1;
const METADATA: i16 = 3;
const FIND_COORDINATOR: i16 = 10;
const API_VERSIONS: i16 = 18;

/// The newest versions the proxy lets the client use, by API key.
const VERSION_CAPS: [(i16, i16); 3] = [(FETCH, 4), (METADATA, 4), (FIND_COORDINATOR, 2)];

/// A Kafka frame larger than this is refused (the connection is closed).
const MAX_FRAME_BYTES: usize = 256 << 20;

/// How the proxy answers fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FetchFault {
    /// Fetch responses pass unchanged.
    None = 0,
    /// A fetch from inside a batch (not its first offset) gets the batches after it (tansu 0.6.0's defect).
    SkipFromInsideBatch = 1,
    /// A fetch never gets the batch holding its offset, even from the batch's first offset: a broker that
    /// keeps skipping records it still holds.
    SkipHoldingBatch = 2,
}

impl FetchFault {
    /// Whether a fetch from `offset` must not get the batch `base..=last`.
    fn skips(self, base: i64, last: i64, offset: i64) -> bool {
        offset <= last
            && match self {
                FetchFault::None => false,
                FetchFault::SkipFromInsideBatch => base < offset,
                FetchFault::SkipHoldingBatch => base <= offset,
            }
    }

    fn from_u8(value: u8) -> FetchFault {
        match value {
            1 => FetchFault::SkipFromInsideBatch,
            2 => FetchFault::SkipHoldingBatch,
            _ => FetchFault::None,
        }
    }
}

pub struct KafkaProxy {
    /// Bootstrap servers for clients: the proxy's listeners.
    pub brokers: String,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    fault: AtomicU8,
    skipped: AtomicU64,
    /// Upstream `(host, port)` → the proxy's port for it.
    routes: HashMap<(String, i32), u16>,
    /// The record batches seen in fetch responses: `(topic, partition)` → first offset → last offset.
    batches: Mutex<HashMap<(String, i32), BTreeMap<i64, i64>>>,
}

impl Shared {
    fn fault(&self) -> FetchFault {
        FetchFault::from_u8(self.fault.load(Ordering::SeqCst))
    }

    /// The last offset of a known batch that `fault` skips for a fetch from `offset`.
    fn known_batch_skipped(&self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let fault = self.fault();
        let batches = self.batches.lock().expect("batches lock");
        let (base, last) = batches
            .get(&(topic.to_string(), partition))?
            .range(..=offset)
            .next_back()?;
        fault.skips(*base, *last, offset).then_some(*last)
    }

    fn learn_batch(&self, topic: &str, partition: i32, base: i64, last: i64) {
        let mut batches = self.batches.lock().expect("batches lock");
        batches
            .entry((topic.to_string(), partition))
            .or_default()
            .insert(base, last);
    }
}

impl KafkaProxy {
    /// A listener on loopback for each broker of `upstream` (a bootstrap list such as the mock cluster's,
    /// naming every broker of the cluster), forwarding to it.
    pub async fn start(upstream: &str) -> anyhow::Result<KafkaProxy> {
        let mut listeners = Vec::new();
        let mut routes = HashMap::new();
        for address in upstream.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let (host, port) = address
                .rsplit_once(':')
                .with_context(|| format!("broker address {address:?} has no port"))?;
            let port: i32 = port
                .parse()
                .with_context(|| format!("broker address {address:?} has no valid port"))?;
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            routes.insert((host.to_string(), port), listener.local_addr()?.port());
            listeners.push((listener, address.to_string()));
        }
        anyhow::ensure!(!listeners.is_empty(), "no upstream brokers in {upstream:?}");
        let brokers = listeners
            .iter()
            .map(|(listener, _)| listener.local_addr().map(|a| a.to_string()))
            .collect::<std::io::Result<Vec<_>>>()?
            .join(",");
        let shared = Arc::new(Shared {
            fault: AtomicU8::new(FetchFault::None as u8),
            skipped: AtomicU64::new(0),
            routes,
            batches: Mutex::new(HashMap::new()),
        });
        let tasks = listeners
            .into_iter()
            .map(|(listener, upstream)| tokio::spawn(accept(listener, upstream, shared.clone())))
            .collect();
        Ok(KafkaProxy {
            brokers,
            shared,
            tasks,
        })
    }

    /// Changes how fetches are answered from the next response on.
    pub fn set_fault(&self, fault: FetchFault) {
        self.shared.fault.store(fault as u8, Ordering::SeqCst);
    }

    /// Record batches skipped so far (removed from a response, or fetched past).
    pub fn skipped_batches(&self) -> u64 {
        self.shared.skipped.load(Ordering::SeqCst)
    }
}

impl Drop for KafkaProxy {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn accept(listener: TcpListener, upstream: String, shared: Arc<Shared>) {
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((client, _)) = listener.accept().await {
        let (upstream, shared) = (upstream.clone(), shared.clone());
        connections.spawn(async move {
            if let Ok(server) = TcpStream::connect(&upstream).await {
                relay(client, server, shared).await;
            }
        });
    }
}

/// What the proxy remembers of a request until its response (matched by correlation id) comes back.
struct Pending {
    api_key: i16,
    version: i16,
    /// For a fetch: the offset the client asked for (before any move), by `(topic, partition)`.
    fetch_offsets: HashMap<(String, i32), i64>,
}

async fn relay(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let pending: Mutex<HashMap<i32, Pending>> = Mutex::new(HashMap::new());
    let requests = async {
        while let Some(mut frame) = read_frame(&mut client_read).await {
            if let Some((correlation_id, request)) = parse_request(&mut frame, &shared) {
                pending
                    .lock()
                    .expect("pending lock")
                    .insert(correlation_id, request);
            }
            if write_frame(&mut server_write, &frame).await.is_err() {
                break;
            }
        }
    };
    let responses = async {
        while let Some(frame) = read_frame(&mut server_read).await {
            let request = Reader::new(&frame)
                .i32()
                .and_then(|id| pending.lock().expect("pending lock").remove(&id));
            let frame = match request {
                Some(request) => rewrite_response(frame, &request, &shared),
                None => frame,
            };
            if write_frame(&mut client_write, &frame).await.is_err() {
                break;
            }
        }
    };
    // Either side closing ends both: the halves are dropped, which closes the sockets.
    tokio::select! {
        () = requests => {}
        () = responses => {}
    }
}

async fn read_frame(reader: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let length = reader.read_i32().await.ok()?;
    let length = usize::try_from(length)
        .ok()
        .filter(|l| *l <= MAX_FRAME_BYTES)?;
    let mut frame = vec![0; length];
    reader.read_exact(&mut frame).await.ok()?;
    Some(frame)
}

async fn write_frame(writer: &mut (impl AsyncWrite + Unpin), frame: &[u8]) -> std::io::Result<()> {
    let length = i32::try_from(frame.len()).map_err(std::io::Error::other)?;
    writer.write_all(&length.to_be_bytes()).await?;
    writer.write_all(frame).await
}

/// The correlation id and what to remember of a request. Every request header starts with the API key,
/// version and correlation id; a `Fetch` v4 body (after the v1 header's client id) is read for its offsets,
/// and an offset inside a known batch the fault skips is moved past that batch (in place).
fn parse_request(frame: &mut [u8], shared: &Shared) -> Option<(i32, Pending)> {
    let mut moves = Vec::new();
    let mut reader = Reader::new(frame);
    let api_key = reader.i16()?;
    let version = reader.i16()?;
    let correlation_id = reader.i32()?;
    let mut fetch_offsets = HashMap::new();
    if api_key == FETCH && version == 4 {
        reader.nullable_string()?; // client id
        reader.take(4 + 4 + 4 + 4 + 1)?; // replica id, max wait, min bytes, max bytes, isolation level
        for _ in 0..reader.count()? {
            let topic = reader.string()?;
            for _ in 0..reader.count()? {
                let partition = reader.i32()?;
                let offset_at = reader.position;
                let offset = reader.i64()?;
                reader.take(4)?; // partition max bytes
                if let Some(last) = shared.known_batch_skipped(&topic, partition, offset) {
                    shared.skipped.fetch_add(1, Ordering::SeqCst);
                    moves.push((offset_at, last + 1));
                }
                // The offset the client asked for: the batch holding it is never relayed.
                fetch_offsets.insert((topic.clone(), partition), offset);
            }
        }
    }
    for (at, offset) in moves {
        frame[at..at + 8].copy_from_slice(&offset.to_be_bytes());
    }
    Some((
        correlation_id,
        Pending {
            api_key,
            version,
            fetch_offsets,
        },
    ))
}

/// The response as the client gets it. All four rewritten responses have the v0 response header (the
/// correlation id alone).
fn rewrite_response(mut frame: Vec<u8>, request: &Pending, shared: &Shared) -> Vec<u8> {
    const HEADER: usize = 4;
    let rewritten = match (request.api_key, request.version) {
        (API_VERSIONS, version) => {
            cap_versions(&mut frame[HEADER..], version);
            None
        }
        (METADATA, 1..=8) => rewrite_metadata(&frame[HEADER..], request.version, shared),
        (FIND_COORDINATOR, 0..=2) => rewrite_coordinator(&frame[HEADER..], request.version, shared),
        (FETCH, 4) => rewrite_fetch(&frame[HEADER..], &request.fetch_offsets, shared),
        _ => None,
    };
    match rewritten {
        Some(body) => {
            frame.truncate(HEADER);
            frame.extend_from_slice(&body);
            frame
        }
        None => frame,
    }
}

/// Lowers the advertised maximum versions to [`VERSION_CAPS`], in place (same size).
fn cap_versions(body: &mut [u8], version: i16) {
    let flexible = version >= 3;
    let mut patches = Vec::new();
    let mut reader = Reader::new(body);
    let parsed = (|| {
        if reader.i16()? != 0 {
            return Some(()); // an error answer lists nothing to cap
        }
        let count = if flexible {
            reader.uvarint()?.checked_sub(1)? as usize
        } else {
            reader.count()?
        };
        for _ in 0..count {
            let api_key = reader.i16()?;
            reader.i16()?; // min version
            let max_at = reader.position;
            let max = reader.i16()?;
            if let Some((_, cap)) = VERSION_CAPS.iter().find(|(key, _)| *key == api_key)
                && max > *cap
            {
                patches.push((max_at, *cap));
            }
            if flexible {
                reader.tagged_fields()?;
            }
        }
        Some(())
    })();
    if parsed.is_some() {
        for (at, cap) in patches {
            body[at..at + 2].copy_from_slice(&cap.to_be_bytes());
        }
    }
}

fn route(shared: &Shared, host: &str, port: i32) -> (String, i32) {
    match shared.routes.get(&(host.to_string(), port)) {
        Some(proxy_port) => ("127.0.0.1".to_string(), i32::from(*proxy_port)),
        None => (host.to_string(), port),
    }
}

/// Metadata v1..v8: throttle (v3+), then the brokers `[node id, host, port, rack]`, then the rest unchanged.
fn rewrite_metadata(body: &[u8], version: i16, shared: &Shared) -> Option<Vec<u8>> {
    let mut reader = Reader::new(body);
    let mut out = Vec::with_capacity(body.len() + 64);
    if version >= 3 {
        out.extend_from_slice(reader.take(4)?);
    }
    let brokers = reader.count()?;
    put_i32(&mut out, i32::try_from(brokers).ok()?);
    for _ in 0..brokers {
        out.extend_from_slice(reader.take(4)?); // node id
        let host = reader.string()?;
        let port = reader.i32()?;
        let (host, port) = route(shared, &host, port);
        put_string(&mut out, &host);
        put_i32(&mut out, port);
        out.extend_from_slice(reader.nullable_string()?); // rack
    }
    out.extend_from_slice(reader.rest());
    Some(out)
}

/// FindCoordinator v0..v2: [throttle, error code, error message] (v1+), node id, host, port.
fn rewrite_coordinator(body: &[u8], version: i16, shared: &Shared) -> Option<Vec<u8>> {
    let mut reader = Reader::new(body);
    let mut out = Vec::with_capacity(body.len() + 16);
    if version >= 1 {
        out.extend_from_slice(reader.take(4)?); // throttle
    }
    out.extend_from_slice(reader.take(2)?); // error code
    if version >= 1 {
        out.extend_from_slice(reader.nullable_string()?); // error message
    }
    out.extend_from_slice(reader.take(4)?); // node id
    let host = reader.string()?;
    let port = reader.i32()?;
    let (host, port) = route(shared, &host, port);
    put_string(&mut out, &host);
    put_i32(&mut out, port);
    out.extend_from_slice(reader.rest());
    Some(out)
}

/// Fetch v4: throttle, then per topic and partition `[partition, error, high watermark, last stable offset,
/// aborted transactions, records]`; the records of a partition lose the batch the fault removes.
fn rewrite_fetch(
    body: &[u8],
    offsets: &HashMap<(String, i32), i64>,
    shared: &Shared,
) -> Option<Vec<u8>> {
    let mut reader = Reader::new(body);
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(reader.take(4)?); // throttle
    let topics = reader.count()?;
    put_i32(&mut out, i32::try_from(topics).ok()?);
    for _ in 0..topics {
        let topic = reader.string()?;
        put_string(&mut out, &topic);
        let partitions = reader.count()?;
        put_i32(&mut out, i32::try_from(partitions).ok()?);
        for _ in 0..partitions {
            let fixed = reader.take(4 + 2 + 8 + 8)?;
            out.extend_from_slice(fixed);
            let partition = i32::from_be_bytes(fixed[..4].try_into().ok()?);
            let aborted_at = reader.position;
            let aborted = reader.i32()?;
            if aborted > 0 {
                reader.take(usize::try_from(aborted).ok()? * 16)?;
            }
            out.extend_from_slice(&body[aborted_at..reader.position]);
            let length = reader.i32()?;
            if length < 0 {
                put_i32(&mut out, length);
                continue;
            }
            let records = reader.take(usize::try_from(length).ok()?)?;
            let offset = offsets.get(&(topic.clone(), partition)).copied();
            let kept = relay_batches(records, &topic, partition, offset, shared);
            put_i32(&mut out, i32::try_from(kept.len()).ok()?);
            out.extend_from_slice(&kept);
        }
    }
    out.extend_from_slice(reader.rest());
    Some(out)
}

/// The record batches (magic v2) of a partition's fetch answer, learnt, without the one the fault skips for a
/// fetch from `offset`. A batch cut short at the end of the response (the broker's size limit) is kept as it
/// is.
fn relay_batches(
    records: &[u8],
    topic: &str,
    partition: i32,
    offset: Option<i64>,
    shared: &Shared,
) -> Vec<u8> {
    let fault = shared.fault();
    // baseOffset i64, batchLength i32, partitionLeaderEpoch i32, magic i8, crc u32, attributes i16,
    // lastOffsetDelta i32, ...
    const LAST_OFFSET_DELTA_AT: usize = 23;
    const MAGIC_AT: usize = 16;
    let mut out = Vec::with_capacity(records.len());
    let mut position = 0;
    while records.len() - position >= LAST_OFFSET_DELTA_AT + 4 {
        let batch = &records[position..];
        let base = i64::from_be_bytes(batch[..8].try_into().expect("8 bytes"));
        let length = i32::from_be_bytes(batch[8..12].try_into().expect("4 bytes"));
        let Some(end) = usize::try_from(length)
            .ok()
            .map(|length| 12 + length)
            .filter(|end| *end <= batch.len() && *end > LAST_OFFSET_DELTA_AT + 4)
        else {
            break;
        };
        if batch[MAGIC_AT] != 2 {
            break;
        }
        let last_delta = i32::from_be_bytes(
            batch[LAST_OFFSET_DELTA_AT..LAST_OFFSET_DELTA_AT + 4]
                .try_into()
                .expect("4 bytes"),
        );
        let last = base + i64::from(last_delta);
        shared.learn_batch(topic, partition, base, last);
        if offset.is_some_and(|offset| fault.skips(base, last, offset)) {
            shared.skipped.fetch_add(1, Ordering::SeqCst);
        } else {
            out.extend_from_slice(&batch[..end]);
        }
        position += end;
    }
    out.extend_from_slice(&records[position..]);
    out
}

fn put_i32(out: &mut Vec<u8>, value: i32) {
    out.extend_from_slice(&value.to_be_bytes());
}

fn put_string(out: &mut Vec<u8>, value: &str) {
    let length = i16::try_from(value.len()).expect("a host name fits a Kafka string");
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(value.as_bytes());
}

/// Big-endian reads over a Kafka message; `None` when the message ends early.
struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, position: 0 }
    }

    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        let end = self.position.checked_add(count)?;
        let slice = self.bytes.get(self.position..end)?;
        self.position = end;
        Some(slice)
    }

    fn rest(&self) -> &'a [u8] {
        &self.bytes[self.position..]
    }

    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    /// An array length (`i32`, never null here).
    fn count(&mut self) -> Option<usize> {
        usize::try_from(self.i32()?).ok()
    }

    fn string(&mut self) -> Option<String> {
        let length = usize::try_from(self.i16()?).ok()?;
        Some(String::from_utf8_lossy(self.take(length)?).into_owned())
    }

    /// A nullable string, skipped: its bytes as they were encoded (length prefix included), to copy.
    fn nullable_string(&mut self) -> Option<&'a [u8]> {
        let start = self.position;
        let length = self.i16()?;
        if length > 0 {
            self.take(usize::try_from(length).ok()?)?;
        }
        Some(&self.bytes[start..self.position])
    }

    fn uvarint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.take(1)?.first()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn tagged_fields(&mut self) -> Option<()> {
        for _ in 0..self.uvarint()? {
            self.uvarint()?; // tag
            let size = usize::try_from(self.uvarint()?).ok()?;
            self.take(size)?;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(base: i64, last_delta: i32) -> Vec<u8> {
        let mut batch = Vec::new();
        batch.extend_from_slice(&base.to_be_bytes());
        let body_len = 49i32; // a v2 batch header without records
        batch.extend_from_slice(&body_len.to_be_bytes());
        let mut body = vec![0u8; body_len as usize];
        body[4] = 2; // magic
        body[11..15].copy_from_slice(&last_delta.to_be_bytes());
        batch.extend_from_slice(&body);
        batch
    }

    fn shared() -> Shared {
        Shared {
            fault: AtomicU8::new(0),
            skipped: AtomicU64::new(0),
            routes: HashMap::new(),
            batches: Mutex::new(HashMap::new()),
        }
    }

    fn relay(records: &[u8], offset: i64, fault: FetchFault, shared: &Shared) -> Vec<u8> {
        shared.fault.store(fault as u8, Ordering::SeqCst);
        relay_batches(records, "t", 0, Some(offset), shared)
    }

    #[test]
    fn only_the_batch_holding_the_offset_is_dropped() {
        let records = [batch(0, 99), batch(100, 99)].concat();
        let shared = shared();
        let inside = relay(&records, 80, FetchFault::SkipFromInsideBatch, &shared);
        assert_eq!(inside, batch(100, 99));
        let at_start = relay(&records, 0, FetchFault::SkipFromInsideBatch, &shared);
        assert_eq!(
            at_start, records,
            "a fetch from a batch's first offset gets it"
        );
        let holding = relay(&records, 0, FetchFault::SkipHoldingBatch, &shared);
        assert_eq!(holding, batch(100, 99));
        assert_eq!(shared.skipped.load(Ordering::SeqCst), 2);
        let cut_short = [batch(0, 99), batch(100, 99)[..30].to_vec()].concat();
        assert_eq!(
            relay(&cut_short, 5, FetchFault::SkipFromInsideBatch, &shared),
            batch(100, 99)[..30].to_vec(),
            "a partial batch at the end is kept"
        );
        assert_eq!(shared.skipped.load(Ordering::SeqCst), 3);
    }

    /// A Fetch v4 request for topic `t`, partition 0, from `offset`.
    fn fetch_request(offset: i64) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&FETCH.to_be_bytes());
        frame.extend_from_slice(&4i16.to_be_bytes());
        frame.extend_from_slice(&7i32.to_be_bytes()); // correlation id
        put_string(&mut frame, "client");
        frame.extend_from_slice(&[0; 17]); // replica id, max wait, min bytes, max bytes, isolation level
        put_i32(&mut frame, 1);
        put_string(&mut frame, "t");
        put_i32(&mut frame, 1);
        put_i32(&mut frame, 0);
        frame.extend_from_slice(&offset.to_be_bytes());
        put_i32(&mut frame, 1 << 20);
        frame
    }

    #[test]
    fn a_fetch_from_inside_a_known_batch_is_sent_from_the_next_one() {
        let shared = shared();
        shared.learn_batch("t", 0, 0, 99);
        shared.learn_batch("t", 0, 100, 199);
        shared
            .fault
            .store(FetchFault::SkipFromInsideBatch as u8, Ordering::SeqCst);

        let mut inside = fetch_request(80);
        let (id, pending) = parse_request(&mut inside, &shared).expect("parses");
        assert_eq!(id, 7);
        assert_eq!(pending.fetch_offsets[&("t".to_string(), 0)], 80);
        assert_eq!(inside, fetch_request(100), "the offset sent upstream moved");

        let mut at_start = fetch_request(100);
        parse_request(&mut at_start, &shared).expect("parses");
        assert_eq!(
            at_start,
            fetch_request(100),
            "a fetch from a batch's start is kept"
        );

        shared.fault.store(FetchFault::None as u8, Ordering::SeqCst);
        let mut healthy = fetch_request(80);
        parse_request(&mut healthy, &shared).expect("parses");
        assert_eq!(healthy, fetch_request(80), "no fault, no change");
        assert_eq!(shared.skipped.load(Ordering::SeqCst), 1);
    }
}
