//! Restores within their limits, over the real protocols: an archive on an S3 server (s3s-fs over TCP) read
//! by the restorer's gRPC API.
//!
//! - ListConversations reads only each file's footer, with ranged GETs against the S3 server, and lists what
//!   decoding every file would.
//! - GetConversation streams a conversation far larger than the restorer's buffer limits, holding at most the
//!   limits of events at once, and sends exactly the in-memory restore.

use std::sync::Arc;

use chatvault_archive::keys::DataKeys;
use chatvault_core::auth::{Authenticator, Role, token_digest};
use chatvault_core::storage::object_store_from_config;
use chatvault_proto::v1::restore_service_client::RestoreServiceClient;
use chatvault_proto::v1::{
    ChatEvent, EventKind, GetConversationRequest, ListConversationsRequest, RestoreItem,
};
use chatvault_restorer::testing::{Fixture, event};
use chatvault_restorer::{BufferLimits, RestoreApi, Restorer, restore_items, serve_api};
use chatvault_testkit::s3::S3Server;
use tonic::transport::Channel;

const TOPIC: &str = "chatvault.events";
const TOKEN: &str = "restore-token";

fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ascii"),
    );
    request
}

/// Pseudo-random bytes, so files do not compress to their footers.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Conversation `C1`: messages, some replying to earlier roots, edited much later; `C2`: a few messages.
fn events(messages: usize) -> Vec<ChatEvent> {
    let mut events = Vec::new();
    for i in 0..messages {
        let at = 1_000_000 + i as i64 * 100;
        let mut created = event("acme", "C1", &format!("m{i}"), at);
        created.raw_payload = noise(i as u64, 3_000);
        if i % 4 == 1 {
            created.thread_id = format!("m{}", (i / 30) * 30);
        }
        events.push(created);
        if i % 3 == 0 {
            let mut edit = event("acme", "C1", &format!("m{i}"), at + 40_000);
            edit.kind = EventKind::MessageEdited as i32;
            edit.event_id = format!("C1/m{i}/edit");
            edit.text = format!("edited m{i}");
            events.push(edit);
        }
        if i % 100 == 0 {
            events.push(event("acme", "C2", &format!("x{i}"), at + 5));
        }
    }
    events.sort_by_key(|e| e.occurred_at_micros);
    events
}

async fn restore_client(
    address: std::net::SocketAddr,
) -> anyhow::Result<RestoreServiceClient<Channel>> {
    let channel = Channel::from_shared(format!("http://{address}"))?
        .connect()
        .await?;
    Ok(RestoreServiceClient::new(channel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_over_s3_read_only_footers_and_stream_within_the_buffer_limits()
-> anyhow::Result<()> {
    let s3 = S3Server::start("archive").await?;
    let store = object_store_from_config(&s3.storage_config())?;
    let keys_dir = tempfile::tempdir()?;
    let data_keys =
        DataKeys::with_local_keyring(store.clone(), &keys_dir.path().join("keyring.json"))?;
    let fixture = Fixture::over(store.clone(), data_keys.clone(), TOPIC);
    const PER_FILE: usize = 250;
    let all = events(4_000);
    for (batch, rows) in all.chunks(PER_FILE).enumerate() {
        fixture.commit_batch(batch as i32 % 3, rows).await;
    }
    let c1_events = all.iter().filter(|e| e.conversation_id == "C1").count();

    let limits = BufferLimits {
        events: 300,
        bytes: usize::MAX,
    };
    let restorer = Arc::new(
        Restorer::new(store.clone(), data_keys.clone(), TOPIC, 2).with_buffer_limits(limits),
    );
    let mut authenticator = Authenticator::default();
    authenticator.add_token_digest(token_digest(TOKEN), "legal-team", "acme", &[Role::Restore]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (trigger, shutdown) = chatvault_core::shutdown::channel();
    let server = tokio::spawn(serve_api(
        listener,
        // Audit records are not this test's subject: they are kept in memory.
        RestoreApi::new(
            restorer.clone(),
            authenticator,
            chatvault_core::audit::Auditor::new(
                "restorer",
                Arc::new(chatvault_core::audit::MemorySink::default()),
            ),
        ),
        chatvault_restorer::MoreApis::default(),
        shutdown,
    ));
    let mut client = restore_client(address).await?;

    // ListConversations: footers only, over ranged GETs.
    let listed = client
        .list_conversations(authorized(ListConversationsRequest {
            tenant_id: "acme".into(),
        }))
        .await?
        .into_inner()
        .conversations;
    let view: Vec<_> = listed
        .iter()
        .map(|c| {
            (
                c.conversation_id.as_str(),
                c.event_count,
                c.first_event_micros,
            )
        })
        .collect();
    assert_eq!(
        view,
        [("C1", c1_events as u64, 1_000_000), ("C2", 40, 1_000_005)]
    );
    let files = restorer.index().tenant_files("acme").await?;
    let stored: u64 = files.iter().map(|file| file.bytes).sum();
    eprintln!(
        "ListConversations over S3: {} files, {} of {stored} bytes fetched, {} files decoded",
        files.len(),
        restorer.bytes_fetched(),
        restorer.files_read()
    );
    assert_eq!(restorer.files_read(), 0);
    assert_eq!(restorer.footers_read(), files.len() as u64);
    assert!(restorer.bytes_fetched() * 4 < stored);

    // GetConversation with every archived event: streamed within the limits.
    let mut stream = client
        .get_conversation(authorized(GetConversationRequest {
            tenant_id: "acme".into(),
            conversation_id: "C1".into(),
            include_events: true,
            ..GetConversationRequest::default()
        }))
        .await?
        .into_inner();
    let mut items: Vec<RestoreItem> = Vec::new();
    while let Some(item) = stream.message().await? {
        items.push(item);
    }
    eprintln!(
        "GetConversation read {} archive files in all ({} candidate files): the plan once, emission again",
        restorer.files_read(),
        files.len()
    );
    let reference = Restorer::new(store, data_keys, TOPIC, 2);
    let in_memory: Vec<ChatEvent> = reference
        .conversation_events("acme", "C1", 0, 0)
        .await?
        .into_iter()
        .map(|archived| archived.record)
        .collect();
    assert_eq!(in_memory.len(), c1_events);
    assert!(
        items == restore_items(&in_memory, true),
        "the streamed restore differs from the in-memory one"
    );
    // The events of one group or chunk (counted twice while folded) and four files' rows: two in flight, two
    // kept for the next group.
    let bound = 2 * limits.events + 4 * PER_FILE;
    let peak = restorer.peak_buffered_events() as usize;
    eprintln!(
        "GetConversation over S3 and gRPC: {c1_events} events, {} items, at most {peak} events held at once (bound {bound})",
        items.len()
    );
    assert!(peak <= bound, "{peak} held at once, bound {bound}");
    assert!(c1_events > 3 * bound);

    trigger.trigger();
    server.await??;
    Ok(())
}
