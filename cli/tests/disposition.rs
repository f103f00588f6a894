//! Disposition end to end, against a real Kafka protocol peer (librdkafka's mock cluster) and an S3 server:
//! `chatvault retention plan` lists exactly what a policy makes due (holds win), `retention apply` executes
//! that plan by id with rewrite commits and a signed report, a plan made stale by a governance change is
//! refused, `chatvault erase` removes a data subject's events (except held ones) from every restore and
//! every file (read back with DuckDB), `chatvault verify` passes after the rewrites, and every call is
//! audited with callers without the `policy` role denied.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chatvault_archive::chain::{ChainWriter, Commit};
use chatvault_archive::disposition::explain::Explanation;
use chatvault_archive::disposition::{
    DispositionLog, DispositionReport, Document, Plan, Stored, check_report,
};
use chatvault_archive::manifest::{MANIFEST_FORMAT, Manifest, Superseded};
use chatvault_archive::tlog::note::{NoteSigner, SigningKey, VerifierKey};
use chatvault_core::audit::{AuditOutcome, AuditRecord};
use chatvault_core::storage::object_store_from_config;
use chatvault_proto::v1::IngestBatchRequest;
use chatvault_testkit::kafka::read_topic;
use chatvault_testkit::pipeline::{
    ACME_HOLD_TOKEN, ACME_KEY_EXPORT_TOKEN, ACME_POLICY_TOKEN, INGEST_TOKEN, RESTORE_TOKEN, TOPIC,
    authorized, ingest_client, start_archiver, start_gateway, start_restorer, wait_until,
};
use chatvault_testkit::process::write_config;
use common::output_text as text;
use prost::Message as _;

const DAY_MICROS: i64 = 86_400_000_000;

fn ids(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|id| id.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_are_applied_exactly_holds_win_erasure_reaches_every_file_and_verify_passes()
-> anyhow::Result<()> {
    let peers = common::start_peers(2).await?;
    let mut config = peers.config.clone();
    let dir = tempfile::tempdir()?;
    let (signing_key, key_text) = SigningKey::generate("disposition.test")?;
    let key_path = dir.path().join("signing-key");
    std::fs::write(&key_path, key_text)?;
    config.shared.integrity.signing_key_path = Some(key_path);
    let verifier = VerifierKey::parse(&signing_key.verifier_key())?;
    let config_path: PathBuf = dir.path().join("chatvault.toml");
    write_config(&config, &config_path)?;
    let config_arg = config_path.to_string_lossy().to_string();
    let store = object_store_from_config(&config.shared.storage)?;

    let gateway = start_gateway(&config).await?;
    let (archiver, stats) = start_archiver(&config, "archiver").await?;
    let restorer = start_restorer(&config).await?;
    let endpoint = restorer.endpoint();
    let recent = common::BASE_MICROS; // 2025-11-24
    let old = recent - 400 * DAY_MICROS; // 2024-10
    let events = vec![
        // C1: two old messages, one old one mentioning u-ann; recent ones by and about u-ann.
        common::chat_event("acme", "C1", "old-1", old, "u-bob", &[]),
        common::chat_event("acme", "C1", "old-2", old + 60_000_000, "u-ann", &[]),
        common::chat_event(
            "acme",
            "C1",
            "old-3",
            old + 120_000_000,
            "u-bob",
            &["u-ann"],
        ),
        common::chat_event("acme", "C1", "new-1", recent, "u-ann", &[]),
        common::chat_event(
            "acme",
            "C1",
            "new-2",
            recent + 60_000_000,
            "u-bob",
            &["u-ann"],
        ),
        common::chat_event("acme", "C1", "new-3", recent + 120_000_000, "u-carl", &[]),
        // C2 is under a legal hold.
        common::chat_event("acme", "C2", "held-1", old, "u-ann", &[]),
        common::chat_event("acme", "C2", "held-2", recent, "u-ann", &[]),
        // Another tenant's old events are not acme's policy's business.
        common::chat_event("globex", "C1", "globex-old", old, "u-ann", &[]),
    ];
    let total = events.len() as u64;
    ingest_client(&gateway.endpoint())
        .await?
        .ingest_batch(authorized(IngestBatchRequest { events }, INGEST_TOKEN))
        .await?;
    assert!(
        wait_until(Duration::from_secs(60), || {
            stats.events.committed_events.load(Ordering::Relaxed) >= total
        })
        .await,
        "the events were not archived"
    );

    let run =
        |token: &'static str, args: &[&str]| common::run_with_restorer(&endpoint, token, args);
    let as_of = "2025-12-01T00:00:00Z";
    let plan_retention = async |token: &'static str| {
        run(
            token,
            &[
                "retention",
                "plan",
                "--tenant",
                "acme",
                "--as-of",
                as_of,
                "--json",
                "--reason",
                "yearly",
            ],
        )
        .await
    };

    // Without a deleting policy there is nothing to plan; the policy role sets one.
    let nothing = plan_retention(ACME_POLICY_TOKEN).await?;
    assert!(!nothing.status.success());
    assert!(
        text(&nothing).contains("no policy that deletes"),
        "{}",
        text(&nothing)
    );
    let set = run(
        ACME_POLICY_TOKEN,
        &[
            "policy",
            "set",
            "--tenant",
            "acme",
            "--id",
            "chat-1y",
            "--delete-after",
            "365d",
        ],
    )
    .await?;
    assert!(set.status.success(), "{}", text(&set));
    let hold = run(
        ACME_HOLD_TOKEN,
        &[
            "hold",
            "place",
            "--tenant",
            "acme",
            "--id",
            "matter-1",
            "--matter",
            "Doe v. Acme",
            "--conversation",
            "C2",
        ],
    )
    .await?;
    assert!(hold.status.success(), "{}", text(&hold));

    // `policy explain` shows what applies to a conversation and what it decides.
    let explain = async |conversation: &str, json: bool| {
        let mut args = vec![
            "policy",
            "explain",
            "--tenant",
            "acme",
            conversation,
            "--as-of",
            as_of,
        ];
        if json {
            args.push("--json");
        }
        run(ACME_POLICY_TOKEN, &args).await
    };
    let c1 = explain("C1", true).await?;
    assert!(c1.status.success(), "{}", text(&c1));
    let c1: Explanation = serde_json::from_slice(&c1.stdout)?;
    assert_eq!(
        (c1.events, c1.events_due, c1.events_held),
        (6, 3, 0),
        "{c1:?}"
    );
    assert!(c1.policies.len() == 1 && c1.policies[0].applies, "{c1:?}");
    let oldest = c1.oldest_event.as_ref().expect("an oldest event");
    assert_eq!(oldest.due_at_micros, Some(old + 365 * DAY_MICROS));
    assert_eq!(c1.next_due_micros, Some(recent + 365 * DAY_MICROS));
    assert_eq!(c1.holds[0].events_covered, 0);
    let c2 = explain("C2", true).await?;
    let c2: Explanation = serde_json::from_slice(&c2.stdout)?;
    assert_eq!((c2.events_due, c2.events_held), (0, 1), "{c2:?}");
    assert_eq!(c2.holds[0].events_covered, 2);
    let readable = text(&explain("C2", false).await?);
    assert!(
        readable.contains("retention wins over deletion")
            && readable.contains("covers 2 of its event(s)"),
        "{readable}"
    );

    // Callers without the policy role are refused.
    for token in [RESTORE_TOKEN, ACME_HOLD_TOKEN, ACME_KEY_EXPORT_TOKEN] {
        let denied = plan_retention(token).await?;
        assert!(!denied.status.success());
        assert!(
            text(&denied).contains("PermissionDenied"),
            "{}",
            text(&denied)
        );
    }

    // The plan: C1's three old events go (one file or several), C2's old event is held.
    let planned = plan_retention(ACME_POLICY_TOKEN).await?;
    assert!(planned.status.success(), "{}", text(&planned));
    let plan: Plan = serde_json::from_slice(&planned.stdout)?;
    assert_eq!(plan.totals.rows_removed, 3, "{plan:?}");
    assert_eq!(plan.totals.rows_held, 1, "{plan:?}");
    assert_eq!(plan.holds.len(), 1);
    assert!(plan.holds[0].starts_with("matter-1@"), "{:?}", plan.holds);
    let counts: Vec<(&str, u64, u64)> = plan
        .conversations
        .iter()
        .map(|c| (c.conversation_id.as_str(), c.rows_removed, c.rows_held))
        .collect();
    assert_eq!(counts, vec![("C1", 3, 0), ("C2", 0, 1)]);
    let c1 = &plan.conversations[0];
    assert_eq!(c1.policies.len(), 1);
    assert_eq!(
        (
            c1.policies[0].policy.policy_id.as_str(),
            c1.policies[0].rows
        ),
        ("chat-1y", 3)
    );
    // A plan is a dry run: everything still restores.
    let everything_c1 = ids(&["old-1", "old-2", "old-3", "new-1", "new-2", "new-3"]);
    assert_eq!(
        common::restored_message_ids(&endpoint, "acme", "C1").await?,
        everything_c1
    );

    // A governance change after the plan makes it stale, even once undone: holds always win.
    for args in [
        &[
            "hold", "place", "--tenant", "acme", "--id", "matter-2", "--matter", "x",
        ][..],
        &["hold", "release", "--tenant", "acme", "--id", "matter-2"][..],
    ] {
        let changed = run(ACME_HOLD_TOKEN, args).await?;
        assert!(changed.status.success(), "{}", text(&changed));
    }
    let plan_id = plan.plan_id.to_string();
    let stale = run(
        ACME_POLICY_TOKEN,
        &["retention", "apply", "--tenant", "acme", "--plan", &plan_id],
    )
    .await?;
    assert!(!stale.status.success());
    assert!(text(&stale).contains("make a new plan"), "{}", text(&stale));
    // Another tenant's policy holder cannot see or apply acme's plan.
    let foreign = run(
        RESTORE_TOKEN,
        &["retention", "apply", "--tenant", "acme", "--plan", &plan_id],
    )
    .await?;
    assert!(
        text(&foreign).contains("PermissionDenied"),
        "{}",
        text(&foreign)
    );

    // A fresh plan is applied exactly.
    let planned = plan_retention(ACME_POLICY_TOKEN).await?;
    assert!(planned.status.success(), "{}", text(&planned));
    let plan: Plan = serde_json::from_slice(&planned.stdout)?;
    assert_eq!(plan.totals.rows_removed, 3);
    let applied = run(
        ACME_POLICY_TOKEN,
        &[
            "retention",
            "apply",
            "--tenant",
            "acme",
            "--plan",
            &plan.plan_id.to_string(),
            "--json",
        ],
    )
    .await?;
    assert!(applied.status.success(), "{}", text(&applied));
    let report: DispositionReport = serde_json::from_slice(&applied.stdout)?;
    assert_eq!((report.plan_id, report.rows_removed), (plan.plan_id, 3));
    assert!(report.objects_left.is_empty(), "{report:?}");
    // What restores now is what was there minus exactly the planned rows.
    assert_eq!(
        common::restored_message_ids(&endpoint, "acme", "C1").await?,
        ids(&["new-1", "new-2", "new-3"])
    );
    assert_eq!(
        common::restored_message_ids(&endpoint, "acme", "C2").await?,
        ids(&["held-1", "held-2"])
    );
    assert_eq!(
        common::restored_message_ids(&endpoint, "globex", "C1").await?,
        ids(&["globex-old"])
    );
    // Applying twice is refused.
    let again = run(
        ACME_POLICY_TOKEN,
        &[
            "retention",
            "apply",
            "--tenant",
            "acme",
            "--plan",
            &plan.plan_id.to_string(),
        ],
    )
    .await?;
    assert!(text(&again).contains("was applied"), "{}", text(&again));

    // Erasure of u-ann (authored and mentioning): C1's events by and about her go, C2's are held.
    let erase = run(
        ACME_POLICY_TOKEN,
        &[
            "erase",
            "plan",
            "--tenant",
            "acme",
            "--subject",
            "u-ann",
            "--mentioning",
            "--json",
            "--reason",
            "DSR-42",
        ],
    )
    .await?;
    assert!(erase.status.success(), "{}", text(&erase));
    let erasure: Plan = serde_json::from_slice(&erase.stdout)?;
    assert_eq!(
        (erasure.totals.rows_removed, erasure.totals.rows_held),
        (2, 2),
        "{erasure:?}"
    );
    let applied = run(
        ACME_POLICY_TOKEN,
        &[
            "erase",
            "apply",
            "--tenant",
            "acme",
            "--plan",
            &erasure.plan_id.to_string(),
        ],
    )
    .await?;
    assert!(applied.status.success(), "{}", text(&applied));
    assert_eq!(
        common::restored_message_ids(&endpoint, "acme", "C1").await?,
        ids(&["new-3"])
    );
    assert_eq!(
        common::restored_message_ids(&endpoint, "acme", "C2").await?,
        ids(&["held-1", "held-2"])
    );

    // DuckDB, with handed-out keys, reads the files as they are now: no row by or about u-ann outside the hold.
    let archive = peers.s3.bucket_dir().to_string_lossy().to_string();
    let mut rows_by_period = Vec::new();
    for period in ["2024-10", "2025-11"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_chatvault"))
            .args([
                "keys",
                "export",
                "--restorer",
                &endpoint,
                "--tenant",
                "acme",
            ])
            .args([
                "--period",
                period,
                "--format",
                "duckdb",
                "--archive",
                &archive,
            ])
            .env("CHATVAULT_TOKEN", ACME_KEY_EXPORT_TOKEN)
            .env("XDG_CONFIG_HOME", "/nonexistent-chatvault-test")
            .output()?;
        anyhow::ensure!(output.status.success(), "{}", text(&output));
        let script = String::from_utf8(output.stdout)?;
        rows_by_period.push(common::duckdb(
            &script,
            "SELECT string_agg(message_id, ',' ORDER BY message_id) FROM events",
        )?);
    }
    assert_eq!(rows_by_period, vec!["held-1", "held-2,new-3"]);

    // The archive verifies after the rewrites, and the reports are signed and match the chains.
    let verified = common::run_chatvault(&["verify", "-c", &config_arg], &[]).await?;
    assert!(verified.status.success(), "{}", text(&verified));
    assert!(
        text(&verified).contains("superseded by rewrite commits"),
        "{}",
        text(&verified)
    );
    let documents = DispositionLog::new(store.clone())
        .documents(&[verifier])
        .await?;
    let reports: Vec<&DispositionReport> = documents
        .iter()
        .filter_map(|stored| match &stored.document {
            Document::Report(report) => Some(report.as_ref()),
            Document::Plan(_) => None,
        })
        .collect();
    assert_eq!(reports.len(), 2);
    for report in reports {
        check_report(store.clone(), TOPIC, report).await?;
    }

    // Every disposition call is in the audit trail, refusals included.
    let records: Vec<AuditRecord> = read_topic(&peers.kafka.brokers, &format!("{TOPIC}.audit"))?
        .iter()
        .map(|payload| AuditRecord::decode(payload.as_slice()))
        .collect::<Result<_, _>>()?;
    let outcomes = |action: &str, outcome: AuditOutcome| {
        records
            .iter()
            .filter(|record| {
                record.action == format!("chatvault.v1.GovernanceService/{action}")
                    && record.outcome == outcome as i32
            })
            .count()
    };
    assert!(outcomes("PlanDisposition", AuditOutcome::Allowed) >= 3);
    assert_eq!(outcomes("PlanDisposition", AuditOutcome::Denied), 3);
    assert!(outcomes("ApplyDisposition", AuditOutcome::Allowed) >= 2);
    assert!(outcomes("ApplyDisposition", AuditOutcome::Denied) >= 1);

    // A forged rewrite (someone with write access supersedes a file the chain does not hold, linking the
    // manifest correctly) is caught by verify and stops restores of the partition's tenants.
    let writer = ChainWriter::new(store.clone(), TOPIC);
    let partition = report_partition(&documents);
    let head = writer.reader().head(partition).await?;
    let forged = Manifest {
        format: MANIFEST_FORMAT.into(),
        topic: TOPIC.into(),
        partition,
        seq: head.next_seq,
        start_offset: head.end_offset,
        end_offset: head.end_offset,
        batch_id: "forged".into(),
        writer_id: "attacker".into(),
        created_at_micros: 0,
        prev_sha256: head.last_sha256.clone(),
        files: Vec::new(),
        rejected_records: Vec::new(),
        offset_gaps: Vec::new(),
        supersedes: vec![Superseded {
            seq: 0,
            path: "events/tenant=acme/nothing.parquet".into(),
            sha256: "00".into(),
            reason: "forged".into(),
        }],
    };
    assert!(matches!(
        writer.commit(&forged).await?,
        Commit::Committed { .. }
    ));
    let verified = common::run_chatvault(&["verify", "-c", &config_arg], &[]).await?;
    assert!(!verified.status.success());
    assert!(
        text(&verified).contains(&format!("rewrite manifest {}", head.next_seq)),
        "{}",
        text(&verified)
    );
    assert!(
        common::restored_message_ids(&endpoint, "acme", "C1")
            .await
            .is_err()
    );

    archiver.stop().await?;
    restorer.stop().await?;
    gateway.stop().await?;
    Ok(())
}

/// The partition of the first rewrite a report names.
fn report_partition(documents: &[Stored<Document>]) -> i32 {
    documents
        .iter()
        .find_map(|stored| match &stored.document {
            Document::Report(report) => report.rewrites.first().map(|rewrite| rewrite.partition),
            Document::Plan(_) => None,
        })
        .expect("a report with a rewrite")
}
