//! Client commands: talk to a running gateway and restorer over gRPC, like any integration would.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chatvault_proto::v1::ingest_service_client::IngestServiceClient;
use chatvault_proto::v1::restore_item::Item;
use chatvault_proto::v1::restore_service_client::RestoreServiceClient;
use chatvault_proto::v1::{
    GetConversationRequest, IngestBatchRequest, ListConversationsRequest, RestoreItem,
};
use clap::Args;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::sample::{DEMO_CONVERSATION, sample_conversation};

#[derive(Args, Clone)]
pub struct Connection {
    /// Bearer token. Defaults to the sign-in of `chatvault login`, then to the standalone token in
    /// --data-dir.
    #[arg(long, env = "CHATVAULT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Data directory of a standalone instance (to find its token).
    #[arg(long, default_value = "./chatvault-data")]
    data_dir: PathBuf,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("data_dir", &self.data_dir)
            .finish()
    }
}

impl Connection {
    /// The standalone data directory (`--data-dir`).
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// The bearer token, the first of: `--token` (or `CHATVAULT_TOKEN`); the sign-in of `chatvault login`
    /// (renewed when it is about to expire); the standalone token in `--data-dir`.
    pub async fn token(&self) -> anyhow::Result<String> {
        if let Some(token) = &self.token {
            return Ok(token.clone());
        }
        if let Some(token) = crate::login::signed_in_token().await? {
            return Ok(token.expose().to_string());
        }
        let path = self.data_dir.join("standalone-token");
        std::fs::read_to_string(&path)
            .map(|token| token.trim().to_string())
            .with_context(|| {
                format!(
                    "no --token given, not signed in (`chatvault login`), and {} is not readable",
                    path.display()
                )
            })
    }
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    connection: Connection,
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    gateway: String,
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    restorer: String,
    #[arg(long, default_value = crate::roles::STANDALONE_TENANT)]
    tenant: String,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    connection: Connection,
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    restorer: String,
    #[arg(long)]
    tenant: String,
    #[arg(long)]
    conversation: String,
    /// Print every item as JSON lines instead of a transcript.
    #[arg(long)]
    json: bool,
    /// Also write the conversation's evidence (its events with the inclusion proofs in the transparency log's
    /// newest checkpoint) to this file, for `chatvault verify-export`.
    #[arg(long, value_name = "FILE")]
    evidence: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct ConversationsArgs {
    #[command(flatten)]
    connection: Connection,
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    restorer: String,
    #[arg(long)]
    tenant: String,
}

pub fn authorized<T>(message: T, token: &str) -> anyhow::Result<Request<T>> {
    let mut request = Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .context("the token contains characters not allowed in a header")?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

pub async fn channel(address: &str) -> anyhow::Result<Channel> {
    Channel::from_shared(address.to_string())
        .with_context(|| format!("bad address {address}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {address}"))
}

pub async fn fetch_conversation(
    restorer: &str,
    token: &str,
    tenant: &str,
    conversation: &str,
    include_evidence: bool,
) -> anyhow::Result<Vec<RestoreItem>> {
    let mut client = RestoreServiceClient::new(channel(restorer).await?);
    let mut stream = client
        .get_conversation(authorized(
            GetConversationRequest {
                tenant_id: tenant.into(),
                conversation_id: conversation.into(),
                include_evidence,
                ..Default::default()
            },
            token,
        )?)
        .await
        .map_err(|status| {
            anyhow::anyhow!("restore failed: {:?}: {}", status.code(), status.message())
        })?
        .into_inner();
    let mut items = Vec::new();
    while let Some(item) = stream.message().await.map_err(|status| {
        anyhow::anyhow!(
            "restore stream failed: {:?}: {}",
            status.code(),
            status.message()
        )
    })? {
        items.push(item);
    }
    Ok(items)
}

/// Sends the sample conversation, waits until it is archived, and prints it restored.
pub async fn run_demo(
    gateway: &str,
    restorer: &str,
    token: &str,
    tenant: &str,
) -> anyhow::Result<()> {
    let events = sample_conversation(tenant);
    let expected_messages = events
        .iter()
        .filter(|event| event.kind == chatvault_proto::v1::EventKind::MessageCreated as i32)
        .count();
    let mut ingest = IngestServiceClient::new(channel(gateway).await?);
    let started = Instant::now();
    let response = ingest
        .ingest_batch(authorized(IngestBatchRequest { events }, token)?)
        .await
        .map_err(|status| {
            anyhow::anyhow!("ingest failed: {:?}: {}", status.code(), status.message())
        })?
        .into_inner();
    println!(
        "demo: {} events acknowledged in {} ms (by Kafka; standalone acknowledges only once archived); reading them back...",
        response.event_ids.len(),
        started.elapsed().as_millis()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let items = fetch_conversation(restorer, token, tenant, DEMO_CONVERSATION, false).await?;
        let messages = items
            .iter()
            .filter(|item| matches!(item.item, Some(Item::Message(_))))
            .count();
        if messages >= expected_messages {
            println!(
                "demo: restored {DEMO_CONVERSATION} from encrypted Parquet {} ms after sending:\n",
                started.elapsed().as_millis()
            );
            print!("{}", chatvault_restorer::render::render_text(&items));
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the conversation was not archived within 60 s ({messages} of {expected_messages} messages)"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    run_demo(
        &args.gateway,
        &args.restorer,
        &args.connection.token().await?,
        &args.tenant,
    )
    .await
}

pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let items = fetch_conversation(
        &args.restorer,
        &args.connection.token().await?,
        &args.tenant,
        &args.conversation,
        args.evidence.is_some(),
    )
    .await?;
    if let Some(path) = &args.evidence {
        let evidence = items
            .iter()
            .find_map(|item| match &item.item {
                Some(Item::Evidence(document)) => Some(document),
                _ => None,
            })
            .context("the restorer sent no evidence")?;
        std::fs::write(path, evidence).with_context(|| format!("writing {}", path.display()))?;
        eprintln!(
            "evidence written to {} (check it offline: chatvault verify-export {} --trusted-key <key>)",
            path.display(),
            path.display()
        );
    }
    if args.json {
        for item in &items {
            if !matches!(item.item, Some(Item::Evidence(_))) {
                println!("{}", serde_json::to_string(&item_json(item))?);
            }
        }
    } else {
        print!("{}", chatvault_restorer::render::render_text(&items));
    }
    Ok(())
}

fn item_json(item: &RestoreItem) -> serde_json::Value {
    match &item.item {
        Some(Item::Message(message)) => serde_json::json!({
            "type": "message",
            "message_id": message.message_id,
            "thread_id": message.thread_id,
            "sender_id": message.sender.as_ref().map(|s| s.id.clone()).unwrap_or_default(),
            "created_at_micros": message.created_at_micros,
            "text": message.text,
            "edited": message.edited,
            "deleted": message.deleted,
            "revisions": message.revisions.iter().map(|r| serde_json::json!({"text": r.text, "at_micros": r.at_micros})).collect::<Vec<_>>(),
            "reactions": message.reactions.iter().map(|r| serde_json::json!({"name": r.name, "user_ids": r.user_ids})).collect::<Vec<_>>(),
        }),
        Some(Item::Event(event)) | Some(Item::ArchivedEvent(event)) => serde_json::json!({
            "type": "event",
            "event_id": event.event_id,
            "kind": chatvault_core::event::kind_name(event.kind),
            "sender_id": event.sender.as_ref().map(|s| s.id.clone()).unwrap_or_default(),
            "occurred_at_micros": event.occurred_at_micros,
            "text": event.text,
        }),
        Some(Item::Evidence(_)) => serde_json::json!({"type": "evidence"}),
        Some(Item::Integrity(status)) => serde_json::json!({
            "type": "integrity",
            "coverage": status.coverage().as_str_name(),
            "files": status.files,
            "uncovered_files": status.uncovered_files,
            "tree_size": status.tree_size,
            "checkpoint": status.checkpoint,
            "detail": status.detail,
        }),
        None => serde_json::Value::Null,
    }
}

pub async fn conversations(args: ConversationsArgs) -> anyhow::Result<()> {
    let mut client = RestoreServiceClient::new(channel(&args.restorer).await?);
    let response = client
        .list_conversations(authorized(
            ListConversationsRequest {
                tenant_id: args.tenant.clone(),
            },
            &args.connection.token().await?,
        )?)
        .await
        .map_err(|status| {
            anyhow::anyhow!("list failed: {:?}: {}", status.code(), status.message())
        })?
        .into_inner();
    println!(
        "{:<32} {:>8}  first event → last event (UTC dates)",
        "conversation", "events"
    );
    for summary in response.conversations {
        println!(
            "{:<32} {:>8}  {} → {}",
            summary.conversation_id,
            summary.event_count,
            chatvault_core::time::Date::from_micros(summary.first_event_micros).iso(),
            chatvault_core::time::Date::from_micros(summary.last_event_micros).iso()
        );
    }
    Ok(())
}
