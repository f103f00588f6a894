//! Retention policies and legal holds through the restorer's GovernanceService and the `chatvault policy` /
//! `chatvault hold` commands, against a real Kafka protocol peer (librdkafka's mock cluster, for the audit
//! trail) and an S3 server (the archive, where the changes are committed): roles are enforced per tenant,
//! every call is recorded in the audit trail, the changes are versioned in the archive's governance stream,
//! and `chatvault verify` checks that stream.

mod common;

use chatvault_archive::governance::GovernanceLog;
use chatvault_core::audit::{AuditOutcome, AuditRecord};
use chatvault_testkit::kafka::{TestKafka, read_topic};
use chatvault_testkit::pipeline::{
    ACME_HOLD_TOKEN, ACME_POLICY_TOKEN, RESTORE_TOKEN, TOPIC, start_restorer, test_config,
    wait_until,
};
use chatvault_testkit::s3::S3Server;
use common::output_text as text;
use prost::Message as _;

async fn chatvault(args: &[&str]) -> anyhow::Result<std::process::Output> {
    common::run_chatvault(args, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_and_holds_are_role_checked_audited_versioned_and_verified() -> anyhow::Result<()>
{
    let kafka = TestKafka::start(TOPIC, 2)?;
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    let restorer = start_restorer(&config).await?;
    let endpoint = restorer.endpoint();
    let run = |token: &'static str, args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
        all.extend([
            "--restorer".into(),
            endpoint.clone(),
            "--token".into(),
            token.into(),
        ]);
        async move {
            let borrowed: Vec<&str> = all.iter().map(String::as_str).collect();
            chatvault(&borrowed).await
        }
    };

    // The hold role places a hold narrowed by conversation, custodian and time.
    let placed = run(
        ACME_HOLD_TOKEN,
        &[
            "hold",
            "place",
            "--tenant",
            "acme",
            "--id",
            "matter-7",
            "--matter",
            "Doe v. Acme",
            "--conversation",
            "C1",
            "--custodian",
            "u-ann",
            "--from",
            "2025-11-01T00:00:00Z",
            "--reason",
            "LIT-7",
        ],
    )
    .await?;
    assert!(placed.status.success(), "{}", text(&placed));
    assert!(
        text(&placed).contains("hold matter-7 placed (tenant acme, governance version 0)"),
        "{}",
        text(&placed)
    );

    // Policies need the policy role: the hold role is denied, and so is another tenant.
    let set_policy = [
        "policy",
        "set",
        "--tenant",
        "acme",
        "--id",
        "chat-7y",
        "--retain",
        "7y",
        "--delete-after",
        "7y",
        "--reason",
        "SEC 17a-4",
    ];
    let denied = run(ACME_HOLD_TOKEN, &set_policy).await?;
    assert!(!denied.status.success());
    assert!(
        text(&denied).contains("PermissionDenied")
            && text(&denied).contains("does not hold the policy role"),
        "{}",
        text(&denied)
    );
    let elsewhere = run(
        ACME_POLICY_TOKEN,
        &[
            "policy",
            "set",
            "--tenant",
            "globex",
            "--id",
            "x",
            "--delete-after",
            "30d",
        ],
    )
    .await?;
    assert!(!elsewhere.status.success(), "{}", text(&elsewhere));
    let set = run(ACME_POLICY_TOKEN, &set_policy).await?;
    assert!(set.status.success(), "{}", text(&set));
    // Bad input names the problem and commits nothing.
    let bad = run(
        ACME_POLICY_TOKEN,
        &[
            "policy",
            "set",
            "--tenant",
            "acme",
            "--id",
            "short",
            "--retain",
            "30d",
            "--delete-after",
            "7d",
        ],
    )
    .await?;
    assert!(
        !bad.status.success() && text(&bad).contains("shorter than retain_days"),
        "{}",
        text(&bad)
    );
    let conversation = run(
        ACME_POLICY_TOKEN,
        &[
            "policy",
            "set",
            "--tenant",
            "acme",
            "--id",
            "c2-30d",
            "--scope",
            "conversation:C2",
            "--delete-after",
            "30d",
        ],
    )
    .await?;
    assert!(conversation.status.success(), "{}", text(&conversation));

    let listed = run(ACME_POLICY_TOKEN, &["policy", "list", "--tenant", "acme"]).await?;
    let listed_text = text(&listed);
    assert!(listed.status.success(), "{listed_text}");
    assert!(listed_text.contains("chat-7y v1 (tenant, retain-then-delete: retain 2555 d, delete after 2555 d)  set by policy-acme"), "{listed_text}");
    assert!(
        listed_text.contains("c2-30d v2 (conversation:C2, delete-after"),
        "{listed_text}"
    );
    assert!(
        listed_text.contains("at governance version 2"),
        "{listed_text}"
    );

    let holds = run(ACME_HOLD_TOKEN, &["hold", "list", "--tenant", "acme"]).await?;
    assert!(
        text(&holds).contains("matter-7 v0 (active; placed by hold-acme): Doe v. Acme: covers tenant acme: conversations C1; custodians u-ann; occurred 2025-11-01 to …"),
        "{}",
        text(&holds)
    );
    let released = run(
        ACME_HOLD_TOKEN,
        &[
            "hold", "release", "--tenant", "acme", "--id", "matter-7", "--reason", "settled",
        ],
    )
    .await?;
    assert!(released.status.success(), "{}", text(&released));
    let again = run(
        ACME_HOLD_TOKEN,
        &["hold", "release", "--tenant", "acme", "--id", "matter-7"],
    )
    .await?;
    assert!(
        text(&again).contains("already released"),
        "{}",
        text(&again)
    );
    let active = run(ACME_HOLD_TOKEN, &["hold", "list", "--tenant", "acme"]).await?;
    assert!(text(&active).contains("0 hold(s)"), "{}", text(&active));
    let all = run(
        ACME_HOLD_TOKEN,
        &["hold", "list", "--tenant", "acme", "--all", "--json"],
    )
    .await?;
    let hold: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&all.stdout).trim())?;
    assert_eq!(hold["released_by"], "hold-acme");
    assert_eq!(
        (hold["placed_version"].as_u64(), hold["version"].as_u64()),
        (Some(0), Some(3))
    );

    // The archive holds the versioned history, with who did what and why.
    let store = chatvault_core::storage::object_store_from_config(&config.shared.storage)?;
    let state = GovernanceLog::new(store.clone()).state().await?;
    assert_eq!(state.version, Some(3));
    assert_eq!(
        state.policy("acme", "chat-7y").map(|p| p.set_by.as_str()),
        Some("policy-acme")
    );

    // Every call is in the audit trail, allowed or refused, under the caller's name.
    let expected = [
        (
            "GovernanceService/PlaceHold",
            "hold-acme",
            AuditOutcome::Allowed,
        ),
        (
            "GovernanceService/SetPolicy",
            "hold-acme",
            AuditOutcome::Denied,
        ),
        (
            "GovernanceService/SetPolicy",
            "policy-acme",
            AuditOutcome::Allowed,
        ),
        (
            "GovernanceService/ListPolicies",
            "policy-acme",
            AuditOutcome::Allowed,
        ),
        (
            "GovernanceService/ReleaseHold",
            "hold-acme",
            AuditOutcome::Allowed,
        ),
        (
            "GovernanceService/ListHolds",
            "hold-acme",
            AuditOutcome::Allowed,
        ),
    ];
    let audit_topic = format!("{TOPIC}.audit");
    let mut records = Vec::new();
    let found = wait_until(std::time::Duration::from_secs(20), || {
        records = read_topic(&kafka.brokers, &audit_topic)
            .unwrap_or_default()
            .iter()
            .filter_map(|payload| AuditRecord::decode(payload.as_slice()).ok())
            .collect();
        expected.iter().all(|(action, subject, outcome)| {
            records.iter().any(|r| {
                r.action.ends_with(action)
                    && r.subject == *subject
                    && r.outcome == *outcome as i32
                    && r.tenant_id == "acme"
            })
        })
    })
    .await;
    assert!(found, "{records:#?}");
    // The refused release (already released) is an error outcome, not a silent success.
    assert!(records.iter().any(|r| r.action.ends_with("ReleaseHold") && r.outcome != AuditOutcome::Allowed as i32));

    // The restore role alone reaches neither.
    let outsider = run(RESTORE_TOKEN, &["hold", "list", "--tenant", "acme"]).await?;
    assert!(!outsider.status.success(), "{}", text(&outsider));

    // verify checks the stream like any other: no problem, and the governance chain counted.
    let data_dir = tempfile::tempdir()?;
    let config_path = data_dir.path().join("chatvault.toml");
    chatvault_testkit::process::write_config(&config, &config_path)?;
    let verified = chatvault(&[
        "verify",
        "-c",
        config_path.to_str().expect("utf-8"),
        "--json",
    ])
    .await?;
    assert!(verified.status.success(), "{}", text(&verified));
    let report: serde_json::Value = serde_json::from_slice(&verified.stdout)?;
    assert_eq!(report["manifests"]["_governance"], 4, "{report}");
    restorer.stop().await?;
    Ok(())
}
