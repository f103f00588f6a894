//! The whole pipeline over real protocols: gRPC ingest → librdkafka's mock cluster (TCP) → two archivers →
//! encrypted Parquet on an S3 server (S3 over TCP) → restorer over gRPC. Every conversation is restored and
//! compared exactly with what was sent.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chatvault_proto::v1::restore_item::Item;
use chatvault_proto::v1::{
    ChatEvent, GetConversationRequest, IngestBatchRequest, IngestRequest, ListConversationsRequest,
};
use chatvault_testkit::kafka::{TestKafka, record_count};
use chatvault_testkit::pipeline::{
    INGEST_TOKEN, RESTORE_TOKEN, TENANTS, TOPIC, authorized, ingest_client, restore_client,
    start_archiver, start_gateway, start_restorer, test_config, wait_until,
};
use chatvault_testkit::s3::S3Server;
use common::{expected_archive, model_messages, workload};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_conversation_restores_exactly_what_was_sent() -> anyhow::Result<()> {
    let kafka = TestKafka::start(TOPIC, 4)?;
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    let gateway = start_gateway(&config).await?;
    let (archiver_a, stats_a) = start_archiver(&config, "archiver-a").await?;
    let (archiver_b, stats_b) = start_archiver(&config, "archiver-b").await?;
    let restorer = start_restorer(&config).await?;

    let sent = workload(7, TENANTS, 6, 170);
    let mut client = ingest_client(&gateway.endpoint()).await?;
    let (batched, rest) = sent.split_at(sent.len() / 2);
    let (streamed, unary) = rest.split_at(rest.len() - 60);
    for chunk in batched.chunks(250) {
        client
            .ingest_batch(authorized(
                IngestBatchRequest {
                    events: chunk.to_vec(),
                },
                INGEST_TOKEN,
            ))
            .await?;
    }
    let stream_requests: Vec<IngestRequest> = streamed
        .iter()
        .map(|event| IngestRequest {
            event: Some(event.clone()),
        })
        .collect();
    let acknowledged = client
        .ingest_stream(authorized(
            tokio_stream::iter(stream_requests),
            INGEST_TOKEN,
        ))
        .await?
        .into_inner();
    assert_eq!(acknowledged.event_ids.len(), streamed.len());
    for event in unary {
        client
            .ingest(authorized(
                IngestRequest {
                    event: Some(event.clone()),
                },
                INGEST_TOKEN,
            ))
            .await?;
    }
    // Retries: a tenth of the events sent again, as a sender would after a timeout.
    let retried: Vec<ChatEvent> = sent.iter().step_by(10).cloned().collect();
    client
        .ingest_batch(authorized(
            IngestBatchRequest {
                events: retried.clone(),
            },
            INGEST_TOKEN,
        ))
        .await?;

    let produced = record_count(&kafka.brokers, TOPIC)?;
    assert_eq!(
        produced as usize,
        sent.len() + retried.len(),
        "every acknowledged send is one Kafka record"
    );
    let archived_everything = wait_until(Duration::from_secs(20), || {
        let committed = stats_a
            .events
            .committed_records
            .load(std::sync::atomic::Ordering::Relaxed)
            + stats_b
                .events
                .committed_records
                .load(std::sync::atomic::Ordering::Relaxed);
        committed as i64 >= produced
    })
    .await;
    assert!(
        archived_everything,
        "archivers did not commit all {produced} records within 60 s"
    );

    let expected = expected_archive(&sent);
    let mut restore = restore_client(&restorer.endpoint()).await?;
    let mut conversations: BTreeMap<(String, String), Vec<&ChatEvent>> = BTreeMap::new();
    for event in expected.values() {
        conversations
            .entry((event.tenant_id.clone(), event.conversation_id.clone()))
            .or_default()
            .push(event);
    }
    for tenant in TENANTS {
        let listed = restore
            .list_conversations(authorized(
                ListConversationsRequest {
                    tenant_id: tenant.to_string(),
                },
                RESTORE_TOKEN,
            ))
            .await?
            .into_inner()
            .conversations;
        let expected_ids: Vec<&String> = conversations
            .keys()
            .filter(|(t, _)| t == tenant)
            .map(|(_, c)| c)
            .collect();
        let listed_ids: Vec<&String> = listed
            .iter()
            .map(|summary| &summary.conversation_id)
            .collect();
        assert_eq!(listed_ids, expected_ids, "conversations of {tenant}");
    }
    for ((tenant, conversation), events) in &conversations {
        let mut stream = restore
            .get_conversation(authorized(
                GetConversationRequest {
                    tenant_id: tenant.clone(),
                    conversation_id: conversation.clone(),
                    include_events: true,
                    ..Default::default()
                },
                RESTORE_TOKEN,
            ))
            .await?
            .into_inner();
        let mut archived: BTreeMap<String, ChatEvent> = BTreeMap::new();
        let mut messages = Vec::new();
        while let Some(item) = stream.message().await? {
            match item.item {
                Some(Item::ArchivedEvent(mut event)) => {
                    assert!(
                        event.received_at_micros > 0,
                        "the gateway stamps the receive time"
                    );
                    event.received_at_micros = 0;
                    assert!(
                        archived.insert(event.event_id.clone(), event).is_none(),
                        "duplicates are collapsed"
                    );
                }
                Some(Item::Message(message)) => messages.push(message),
                _ => {}
            }
        }
        let wanted: BTreeMap<String, ChatEvent> = events
            .iter()
            .map(|event| (event.event_id.clone(), (*event).clone()))
            .collect();
        assert_eq!(
            archived.len(),
            wanted.len(),
            "{tenant}/{conversation}: event count"
        );
        for (event_id, event) in &wanted {
            assert_eq!(
                archived.get(event_id),
                Some(event),
                "{tenant}/{conversation}: event {event_id}"
            );
        }
        let model = model_messages(events);
        assert_eq!(
            messages.len(),
            model.len(),
            "{tenant}/{conversation}: message count"
        );
        for message in &messages {
            let expected_message = &model[&message.message_id];
            assert_eq!(
                (
                    &message.text,
                    message.edited,
                    message.deleted,
                    &message.thread_id
                ),
                (
                    &expected_message.text,
                    expected_message.edited,
                    expected_message.deleted,
                    &expected_message.thread_id
                ),
                "{tenant}/{conversation}: message {}",
                message.message_id
            );
        }
    }

    gateway.stop().await?;
    archiver_a.stop().await?;
    archiver_b.stop().await?;
    restorer.stop().await?;
    Ok(())
}

/// Senders that number events per conversation reuse `event_id`s across conversations and tenants: every one
/// of those events is archived and restored (identity is `(tenant, conversation, event_id)`), while a resent
/// copy still collapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_ids_repeated_across_conversations_and_tenants_are_all_kept() -> anyhow::Result<()> {
    let kafka = TestKafka::start(TOPIC, 2)?;
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    let gateway = start_gateway(&config).await?;
    let (archiver, stats) = start_archiver(&config, "archiver").await?;
    let restorer = start_restorer(&config).await?;

    let mut events = Vec::new();
    for (tenant, conversations) in [("acme", 8), ("globex", 1)] {
        for conversation in 0..conversations {
            for id in 1..=5 {
                events.push(ChatEvent {
                    event_id: id.to_string(),
                    tenant_id: tenant.into(),
                    conversation_id: format!("seq-{conversation}"),
                    message_id: format!("m{id}"),
                    kind: chatvault_proto::v1::EventKind::MessageCreated as i32,
                    occurred_at_micros: common::BASE_MICROS + id,
                    sender: Some(chatvault_proto::v1::Sender {
                        id: "U1".into(),
                        ..Default::default()
                    }),
                    text: format!("{tenant} {conversation} {id}"),
                    ..Default::default()
                });
            }
        }
    }
    assert_eq!(events.len(), 45);
    let mut client = ingest_client(&gateway.endpoint()).await?;
    // Sent twice: the second copy of each event must collapse, and nothing else.
    for _ in 0..2 {
        client
            .ingest_batch(authorized(
                IngestBatchRequest {
                    events: events.clone(),
                },
                INGEST_TOKEN,
            ))
            .await?;
    }
    let produced = record_count(&kafka.brokers, TOPIC)?;
    assert_eq!(produced, 90);
    assert!(
        wait_until(Duration::from_secs(60), || {
            stats
                .events
                .committed_records
                .load(std::sync::atomic::Ordering::Relaxed) as i64
                >= produced
        })
        .await,
        "not archived in time"
    );

    let mut restore = restore_client(&restorer.endpoint()).await?;
    let mut restored = Vec::new();
    for (tenant, conversations) in [("acme", 8), ("globex", 1)] {
        let listed = restore
            .list_conversations(authorized(
                ListConversationsRequest {
                    tenant_id: tenant.into(),
                },
                RESTORE_TOKEN,
            ))
            .await?
            .into_inner()
            .conversations;
        assert_eq!(listed.len(), conversations, "{tenant}: conversations");
        for summary in listed {
            assert_eq!(
                summary.event_count, 5,
                "{tenant}/{}",
                summary.conversation_id
            );
            let mut stream = restore
                .get_conversation(authorized(
                    GetConversationRequest {
                        tenant_id: tenant.into(),
                        conversation_id: summary.conversation_id.clone(),
                        include_events: true,
                        ..Default::default()
                    },
                    RESTORE_TOKEN,
                ))
                .await?
                .into_inner();
            while let Some(item) = stream.message().await? {
                if let Some(Item::ArchivedEvent(event)) = item.item {
                    restored.push((tenant, event.conversation_id, event.event_id, event.text));
                }
            }
        }
    }
    assert_eq!(restored.len(), 45, "every acknowledged event restores once");
    assert!(
        restored.iter().all(|(tenant, conversation, id, text)| *text
            == format!("{tenant} {} {id}", &conversation["seq-".len()..])),
        "each event keeps its own text"
    );

    gateway.stop().await?;
    archiver.stop().await?;
    restorer.stop().await?;
    Ok(())
}
