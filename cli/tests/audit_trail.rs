//! The audit trail: every call of the gateway and the restorer, allowed or refused, leaves exactly one record
//! on the Kafka audit topic (through a real broker: librdkafka's mock cluster over TCP), with who, what, from
//! where and the outcome; and a call whose record cannot be made durable is not served. The archiver commits
//! the records to the archive (encrypted Parquet on an S3 server, through the audit topic's manifest chains),
//! where they outlive every process, are queried by holders of `audit` (AuditService, `chatvault audit`), and
//! a removed or edited record is detected.

mod common;

use std::collections::HashMap;

use chatvault_core::audit::{AuditOutcome, AuditRecord};
use chatvault_ingest_gateway::config::{WebhookConfig, WebhookPlatform};
use chatvault_proto::v1::{
    ChatEvent, GetConversationRequest, IngestBatchRequest, IngestRequest, ListConversationsRequest,
    QueryAuditTrailRequest,
};
use chatvault_testkit::kafka::{TestKafka, read_topic};
use chatvault_testkit::pipeline::{
    ACME_AUDIT_TOKEN, ACME_INGEST_TOKEN, INGEST_TOKEN, RESTORE_TOKEN, TOPIC, audit_client,
    authorized, ingest_client, restore_client, start_archiver, start_gateway, start_restorer,
    test_config, wait_until,
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

/// Every record of `tenant` the AuditService returns for `request`, paging through with `page_size`.
async fn query_all(
    endpoint: &str,
    token: &str,
    mut request: QueryAuditTrailRequest,
) -> Result<Vec<AuditRecord>, tonic::Status> {
    let mut client = audit_client(endpoint)
        .await
        .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    let mut records = Vec::new();
    loop {
        let page = client
            .query_audit_trail(authorized(request.clone(), token))
            .await?
            .into_inner();
        records.extend(page.records);
        if page.next_page_token.is_empty() {
            return Ok(records);
        }
        request.page_token = page.next_page_token;
    }
}

fn acme(request: QueryAuditTrailRequest) -> QueryAuditTrailRequest {
    QueryAuditTrailRequest {
        tenant_id: "acme".into(),
        ..request
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archived_trail_survives_restarts_is_queried_exactly_and_shows_tampering()
-> anyhow::Result<()> {
    // Kept whole until the end: dropping it stops the broker, the S3 server and the keyring directory.
    let peers = common::start_peers(2).await?;
    let (s3, config) = (&peers.s3, peers.config.clone());
    let gateway = start_gateway(&config).await?;
    let (archiver, stats) = start_archiver(&config, "archiver").await?;
    let restorer = start_restorer(&config).await?;
    let mut ingest = ingest_client(&gateway.endpoint()).await?;
    ingest
        .ingest_batch(authorized(
            IngestBatchRequest {
                events: vec![event("acme", "m1"), event("acme", "m2")],
            },
            INGEST_TOKEN,
        ))
        .await?;
    let mut restore = restore_client(&restorer.endpoint()).await?;
    let conversation = |id: &str| GetConversationRequest {
        tenant_id: "acme".into(),
        conversation_id: id.into(),
        ..Default::default()
    };
    // Calls about acme: a restore (allowed), a denial, an invalid request whose conversation id tries to
    // forge a second record line, and a list; one about globex, which acme's auditor must never see.
    assert!(
        wait_until(std::time::Duration::from_secs(30), || {
            stats
                .events
                .committed_events
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 2
        })
        .await,
        "the events are archived"
    );
    let mut items = restore
        .get_conversation(authorized(conversation("C1"), RESTORE_TOKEN))
        .await?
        .into_inner();
    while items.message().await?.is_some() {}
    let before_denial = chatvault_core::time::now_micros();
    let denied = restore
        .get_conversation(authorized(conversation("C1"), INGEST_TOKEN))
        .await
        .expect_err("ingest cannot restore");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let forged = "C1\n2026-12-01 00:00:00 UTC  allowed chatvault.v1.RestoreService/GetConversation";
    let invalid = restore
        .get_conversation(authorized(conversation(forged), RESTORE_TOKEN))
        .await
        .expect_err("a control character in the conversation id");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    restore
        .list_conversations(authorized(
            ListConversationsRequest {
                tenant_id: "acme".into(),
            },
            RESTORE_TOKEN,
        ))
        .await?;
    restore
        .list_conversations(authorized(
            ListConversationsRequest {
                tenant_id: "globex".into(),
            },
            RESTORE_TOKEN,
        ))
        .await?;
    // The ingest batch, the five restorer calls: six records, all archived.
    assert!(
        wait_until(std::time::Duration::from_secs(30), || {
            stats
                .audit
                .committed_events
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 6
        })
        .await,
        "the audit records are archived"
    );

    let endpoint = restorer.endpoint();
    let all = query_all(&endpoint, ACME_AUDIT_TOKEN, acme(Default::default())).await?;
    let shape: Vec<(&str, &str, AuditOutcome)> = all
        .iter()
        .map(|r| {
            (
                r.action.trim_start_matches("chatvault.v1."),
                r.subject.as_str(),
                AuditOutcome::try_from(r.outcome).expect("outcome"),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            (
                "IngestService/IngestBatch",
                "ingest-all",
                AuditOutcome::Allowed
            ),
            (
                "RestoreService/GetConversation",
                "restore-all",
                AuditOutcome::Allowed
            ),
            (
                "RestoreService/GetConversation",
                "ingest-all",
                AuditOutcome::Denied
            ),
            (
                "RestoreService/GetConversation",
                "restore-all",
                AuditOutcome::Error
            ),
            (
                "RestoreService/ListConversations",
                "restore-all",
                AuditOutcome::Allowed
            ),
        ],
        "acme's records, oldest first, without globex's: {all:#?}"
    );
    assert_eq!(all[2].conversation_id, "C1");
    assert_eq!(all[3].conversation_id, forged, "kept verbatim");
    // By subject and time range: exactly the restore-all calls after the denial.
    let filtered = query_all(
        &endpoint,
        ACME_AUDIT_TOKEN,
        acme(QueryAuditTrailRequest {
            subject: "restore-all".into(),
            from_micros: before_denial,
            page_size: 1,
            ..Default::default()
        }),
    )
    .await?;
    assert_eq!(
        filtered.iter().map(|r| &r.record_id).collect::<Vec<_>>(),
        [&all[3].record_id, &all[4].record_id]
    );
    let denials = query_all(
        &endpoint,
        ACME_AUDIT_TOKEN,
        acme(QueryAuditTrailRequest {
            outcome: AuditOutcome::Denied as i32,
            action: "chatvault.v1.RestoreService/GetConversation".into(),
            ..Default::default()
        }),
    )
    .await?;
    assert_eq!(denials, [all[2].clone()]);
    // The audit role is needed, for the tenant asked about.
    for (token, tenant) in [(ACME_AUDIT_TOKEN, "globex"), (RESTORE_TOKEN, "acme")] {
        let refused = query_all(
            &endpoint,
            token,
            QueryAuditTrailRequest {
                tenant_id: tenant.into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("without the audit role");
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        assert!(
            refused
                .message()
                .contains(&format!("audit role for tenant {tenant}")),
            "{refused:?}"
        );
    }

    // The command line reads the same trail; nothing in a record can start a line of its own.
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_chatvault"))
            .args(["audit", "--restorer", &endpoint, "--tenant", "acme"])
            .args(args)
            .env("CHATVAULT_TOKEN", ACME_AUDIT_TOKEN)
            .output()
    };
    let text = cli(&[
        "--subject",
        "restore-all",
        "--action",
        "chatvault.v1.RestoreService/GetConversation",
    ])?;
    assert!(text.status.success(), "{text:?}");
    let lines = String::from_utf8(text.stdout)?;
    assert_eq!(lines.lines().count(), 2, "one line per record: {lines}");
    assert!(lines.contains("C1\\u{a}2026-12-01"), "{lines}");
    let json = cli(&["--json", "--outcome", "denied"])?;
    assert!(json.status.success(), "{json:?}");
    let json = String::from_utf8(json.stdout)?;
    let denied_lines: Vec<serde_json::Value> = json
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    // acme's denied calls so far: the restore, and the audit queries refused above (RESTORE_TOKEN's).
    assert!(
        denied_lines
            .iter()
            .any(|r| r["record_id"] == all[2].record_id.as_str()),
        "{json}"
    );
    assert!(denied_lines.iter().all(|r| r["outcome"] == "denied"));

    // Every process restarts (Kafka is the broker; it stays): the trail is read from the archive again.
    gateway.stop().await?;
    restorer.stop().await?;
    archiver.stop().await?;
    let (archiver, _stats) = start_archiver(&config, "archiver-2").await?;
    let restorer = start_restorer(&config).await?;
    let endpoint = restorer.endpoint();
    // The refused audit query by restore-all may still be in Kafka: the new archiver commits it.
    let is_refused_query = |r: &AuditRecord| {
        r.action == "chatvault.v1.AuditService/QueryAuditTrail"
            && r.subject == "restore-all"
            && r.outcome == AuditOutcome::Denied as i32
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let after_restart = loop {
        let records = query_all(&endpoint, ACME_AUDIT_TOKEN, acme(Default::default())).await?;
        if records.iter().any(is_refused_query) || std::time::Instant::now() > deadline {
            break records;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(
        after_restart[..all.len()],
        all[..],
        "every record survives the restart, in order"
    );
    assert!(
        after_restart.iter().any(is_refused_query),
        "the audit queries are audited too: {after_restart:#?}"
    );

    // Tampering with the stored trail: one record of a committed file edited, then the file removed.
    let audit_dir = s3.bucket_dir().join("audit");
    let mut files = Vec::new();
    for day in std::fs::read_dir(&audit_dir)? {
        for file in std::fs::read_dir(day?.path())? {
            files.push(file?.path());
        }
    }
    files.sort();
    let first = files.first().expect("an audit file").clone();
    let original = std::fs::read(&first)?;
    let keys = chatvault_testkit::pipeline::data_keys(&config).await?;
    let period = chatvault_core::time::Date::from_micros(all[0].time_micros).month_period();
    let key = keys
        .get(chatvault_archive::kind::AUDIT_KEY_SCOPE, &period)
        .await?;
    let mut rows = chatvault_archive::audit::decode_audit_file(original.clone().into(), &key)?;
    rows[0].record.subject = "someone-else".into();
    let mut edited: Vec<_> = rows.iter().collect();
    let rewritten = chatvault_archive::audit::encode_audit_file(
        &mut edited,
        &key,
        &chatvault_archive::file::FileOptions::default(),
    )?;
    std::fs::write(&first, &rewritten.bytes)?;
    let altered = query_all(&endpoint, ACME_AUDIT_TOKEN, acme(Default::default()))
        .await
        .expect_err("an edited file is detected");
    assert_eq!(altered.code(), Code::Internal);
    assert!(altered.message().contains("was altered"), "{altered:?}");
    std::fs::remove_file(&first)?;
    let removed = query_all(&endpoint, ACME_AUDIT_TOKEN, acme(Default::default()))
        .await
        .expect_err("a removed file is detected");
    assert!(removed.message().contains("is missing"), "{removed:?}");
    std::fs::write(&first, &original)?;
    query_all(&endpoint, ACME_AUDIT_TOKEN, acme(Default::default())).await?;

    restorer.stop().await?;
    archiver.stop().await?;
    Ok(())
}
