//! The audit trail: every call of the gateway and the restorer, allowed or refused, leaves exactly one record
//! on the Kafka audit topic (through a real broker: librdkafka's mock cluster over TCP), with who, what, from
//! where and the outcome; and a call whose record cannot be made durable is not served.

mod common;

use std::collections::HashMap;

use chatvault_core::audit::{AuditOutcome, AuditRecord};
use chatvault_ingest_gateway::config::{WebhookConfig, WebhookPlatform};
use chatvault_proto::v1::{
    ChatEvent, GetConversationRequest, IngestBatchRequest, IngestRequest, ListConversationsRequest,
};
use chatvault_testkit::kafka::{TestKafka, read_topic};
use chatvault_testkit::pipeline::{
    ACME_INGEST_TOKEN, INGEST_TOKEN, RESTORE_TOKEN, TOPIC, authorized, ingest_client,
    restore_client, start_gateway, start_restorer, test_config,
};
use chatvault_testkit::s3::S3Server;
use prost::Message as _;
use tonic::Code;

fn event(tenant: &str, message: &str) -> ChatEvent {
    common::message_event(tenant, message, "the quarterly numbers")
}

const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";

/// A signed Slack Events API delivery of one message (the Slack signing scheme: HMAC-SHA256 of
/// `v0:<timestamp>:<body>`).
fn slack_delivery(secret: &str) -> (String, Vec<(&'static str, String)>) {
    let body = serde_json::json!({
        "type": "event_callback", "team_id": "T061EG9R6", "event_id": "Ev0AUDIT1", "event_time": 1_764_000_000,
        "event": {"type": "message", "channel": "C1", "user": "U1", "text": "the quarterly numbers",
                  "ts": "1764000000.000200", "event_ts": "1764000000.000200", "channel_type": "channel"}
    })
    .to_string();
    let timestamp = chatvault_core::time::now_micros() / 1_000_000;
    let mut headers = common::slack_headers(&body, timestamp, secret);
    headers.push((
        "user-agent",
        "Slackbot 1.0 (+https://api.slack.com/robots)".into(),
    ));
    (body, headers)
}

fn audit_records(brokers: &str) -> anyhow::Result<Vec<AuditRecord>> {
    read_topic(brokers, &format!("{TOPIC}.audit"))?
        .iter()
        .map(|payload| Ok(AuditRecord::decode(payload.as_slice())?))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_allowed_or_refused_leaves_exactly_one_record_on_the_audit_topic()
-> anyhow::Result<()> {
    let kafka = TestKafka::start(TOPIC, 2)?;
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let mut config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    config.gateway.webhooks = vec![WebhookConfig {
        name: "acme-slack".into(),
        platform: Some(WebhookPlatform::Slack),
        tenant: "acme".into(),
        secrets: vec![SLACK_SECRET.into()],
        ..Default::default()
    }];
    let gateway = start_gateway(&config).await?;
    let restorer = start_restorer(&config).await?;
    let mut ingest = ingest_client(&gateway.endpoint()).await?;
    let mut restore = restore_client(&restorer.endpoint()).await?;

    // Each call below is tagged by what makes its record unique, with the outcome it must have.
    let mut expected: Vec<(&str, &str, &str, AuditOutcome)> = Vec::new();
    let with_agent = |mut request: tonic::Request<IngestBatchRequest>| {
        request
            .metadata_mut()
            .insert("user-agent", "audit-test/1.0".parse().expect("ascii"));
        request
    };

    ingest
        .ingest_batch(with_agent(authorized(
            IngestBatchRequest {
                events: vec![event("acme", "m1"), event("acme", "m2")],
            },
            INGEST_TOKEN,
        )))
        .await?;
    expected.push((
        "IngestService/IngestBatch",
        "acme",
        "ingest-all",
        AuditOutcome::Allowed,
    ));
    ingest
        .ingest(authorized(
            IngestRequest {
                event: Some(event("globex", "m3")),
            },
            INGEST_TOKEN,
        ))
        .await?;
    expected.push((
        "IngestService/Ingest",
        "globex",
        "ingest-all",
        AuditOutcome::Allowed,
    ));
    // Without the role for the tenant: refused by the service, recorded under the caller's name.
    let denied = ingest
        .ingest(authorized(
            IngestRequest {
                event: Some(event("globex", "m4")),
            },
            ACME_INGEST_TOKEN,
        ))
        .await
        .expect_err("acme's token cannot ingest for globex");
    assert_eq!(denied.code(), Code::PermissionDenied);
    expected.push((
        "IngestService/Ingest",
        "globex",
        "ingest-acme",
        AuditOutcome::Denied,
    ));
    // Without a known token: refused before the message is read, recorded with no identity.
    let unknown = ingest
        .ingest_batch(authorized(
            IngestBatchRequest {
                events: vec![event("acme", "m5")],
            },
            "not-a-token",
        ))
        .await
        .expect_err("unknown token");
    assert_eq!(unknown.code(), Code::Unauthenticated);
    expected.push(("IngestService/IngestBatch", "", "", AuditOutcome::Denied));
    // An invalid request by an authorized caller: an error, not a denial.
    let invalid = ingest
        .ingest_batch(authorized(
            IngestBatchRequest { events: vec![] },
            INGEST_TOKEN,
        ))
        .await
        .expect_err("empty batch");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    expected.push((
        "IngestService/IngestBatch",
        "",
        "ingest-all",
        AuditOutcome::Error,
    ));

    restore
        .list_conversations(authorized(
            ListConversationsRequest {
                tenant_id: "acme".into(),
            },
            RESTORE_TOKEN,
        ))
        .await?;
    expected.push((
        "RestoreService/ListConversations",
        "acme",
        "restore-all",
        AuditOutcome::Allowed,
    ));
    let refused = restore
        .get_conversation(authorized(
            GetConversationRequest {
                tenant_id: "acme".into(),
                conversation_id: "C1".into(),
                ..Default::default()
            },
            INGEST_TOKEN,
        ))
        .await
        .expect_err("the ingest token cannot restore");
    assert_eq!(refused.code(), Code::PermissionDenied);
    expected.push((
        "RestoreService/GetConversation",
        "acme",
        "ingest-all",
        AuditOutcome::Denied,
    ));

    // Webhooks: a signed delivery, a forged one, and the stats endpoint without and with the wrong role.
    let http = reqwest::Client::new();
    let post = |body: String, headers: Vec<(&'static str, String)>| {
        let mut request = http
            .post(format!("{}/webhooks/acme-slack", gateway.http_endpoint()))
            .body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.send()
    };
    let (body, headers) = slack_delivery(SLACK_SECRET);
    let delivered = post(body, headers).await?;
    assert_eq!(delivered.status(), 200, "{:?}", delivered.text().await);
    expected.push((
        "POST /webhooks/acme-slack",
        "acme",
        "",
        AuditOutcome::Allowed,
    ));
    let (body, headers) = slack_delivery("not-the-secret");
    assert_eq!(post(body, headers).await?.status(), 401);
    expected.push((
        "POST /webhooks/acme-slack",
        "acme",
        "",
        AuditOutcome::Denied,
    ));
    let stats = format!("{}/webhooks/stats", gateway.http_endpoint());
    assert_eq!(http.get(&stats).send().await?.status(), 401);
    expected.push(("GET /webhooks/stats", "", "", AuditOutcome::Denied));
    assert_eq!(
        http.get(&stats)
            .bearer_auth(INGEST_TOKEN)
            .send()
            .await?
            .status(),
        403
    );
    expected.push((
        "GET /webhooks/stats",
        "",
        "ingest-all",
        AuditOutcome::Denied,
    ));

    let records = audit_records(&kafka.brokers)?;
    assert_eq!(
        records.len(),
        expected.len(),
        "one record per call: {records:#?}"
    );
    let mut ids = HashMap::new();
    for (record, (action, tenant, subject, outcome)) in records.iter().zip(&expected) {
        let what = format!("{action} {tenant} {subject}");
        let full_action = if action.contains(' ') {
            action.to_string()
        } else {
            format!("chatvault.v1.{action}")
        };
        assert_eq!(record.action, full_action, "{what}");
        assert_eq!(record.tenant_id, *tenant, "{what}");
        assert_eq!(record.subject, *subject, "{what}");
        assert_eq!(
            AuditOutcome::try_from(record.outcome)?,
            *outcome,
            "{what}: {record:?}"
        );
        assert!(
            !record.peer_address.is_empty(),
            "{what}: the source is recorded"
        );
        assert!(
            record.time_micros > 0 && !record.instance.is_empty(),
            "{what}"
        );
        assert!(
            ids.insert(record.record_id.clone(), ()).is_none(),
            "unique ids"
        );
        if *outcome != AuditOutcome::Allowed {
            assert!(!record.reason.is_empty(), "{what}: a refusal says why");
        }
    }
    assert_eq!(records[0].service, "gateway");
    assert_eq!(records[0].item_count, 2, "the batch's events are counted");
    assert!(
        records[0].user_agent.starts_with("audit-test/1.0"),
        "{:?}",
        records[0].user_agent
    );
    assert_eq!(records[0].roles_used, ["ingest"]);
    assert_eq!(records[5].service, "restorer");
    assert!(records[6].reason.contains("does not hold the restore role"));
    assert_eq!(records[7].item_count, 1, "the delivery's one event");
    assert!(records[7].user_agent.starts_with("Slackbot"));
    assert!(
        records[8].reason.contains("Signature does not match"),
        "{:?}",
        records[8].reason
    );
    // Records hold who did what, never what was said or the credentials used.
    let everything = format!("{records:?}");
    assert!(!everything.contains("quarterly numbers"));
    assert!(!everything.contains(INGEST_TOKEN) && !everything.contains("not-a-token"));

    gateway.stop().await?;
    restorer.stop().await?;
    Ok(())
}
