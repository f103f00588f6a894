//! `chatvault drill`: a restore drill. Samples conversations per tenant, restores each through the restorer
//! (gRPC, as a user would: authorized and recorded in the audit trail), re-reads the same rows straight from
//! the Parquet files the documented way (docs/ARCHITECTURE.md, "Writing a compatible reader": the manifest
//! chains, each file's SHA-256, its data key, Parquet modular encryption, copies collapsed), compares the two,
//! checks the chains, key records and transparency log (`verify` without fetching files), and commits a
//! signed report to the archive (`chatvault_archive::drill`). `--history` lists past reports, each signature
//! checked. Exit status 1 when the drill fails; progress on a terminal, `--json` for scripts.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use chatvault_archive::ArchivedEvent;
use chatvault_archive::chain::{ChainReader, topics};
use chatvault_archive::drill::{DrillReport, DrilledConversation, commit_report, read_reports};
use chatvault_archive::file::{conversation_digest, decode_file, sha256_hex};
use chatvault_archive::keys::DataKeys;
use chatvault_archive::manifest::ManifestFile;
use chatvault_archive::tlog::note::VerifierKey;
use chatvault_archive::tlog::{LogTrust, signer_from_config};
use chatvault_archive::verify::{Sampling, verify_archive};
use chatvault_config::Config;
use chatvault_core::storage::object_store_from_config;
use chatvault_core::time::now_micros;
use chatvault_proto::v1::restore_item::Item;
use chatvault_proto::v1::restore_service_client::RestoreServiceClient;
use chatvault_proto::v1::{ChatEvent, GetConversationRequest, ListConversationsRequest};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::client::{Connection, authorized, channel};

#[derive(Args, Debug)]
pub struct DrillArgs {
    #[command(flatten)]
    connection: Connection,
    /// Configuration naming the archive, its keys and the checkpoint signing key; default: the standalone
    /// data directory of --data-dir.
    #[arg(long, short = 'c', env = "CHATVAULT_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    restorer: String,
    /// Conversations sampled per tenant.
    #[arg(long, default_value_t = 3)]
    per_tenant: usize,
    /// Drill only these tenants (repeatable); default: every tenant of the archive.
    #[arg(long = "tenant")]
    tenants: Vec<String>,
    /// The sample's seed (default random; printed in the report).
    #[arg(long)]
    seed: Option<u64>,
    /// List the past drills' reports instead of drilling.
    #[arg(long)]
    history: bool,
    /// Print the report (or the history) as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn drill(args: DrillArgs) -> anyhow::Result<()> {
    let config = load(&args)?;
    let store = object_store_from_config(&config.shared.storage)?;
    let trusted = VerifierKey::parse_all(
        "integrity.trusted_keys",
        &config.shared.integrity.trusted_keys,
    )?;
    if args.history {
        return history(store, &trusted, args.json).await;
    }
    let signing_key = signer_from_config(&config.shared.integrity, &config.shared.keys.pkcs11)?
        .context(
            "neither integrity.signing_key_path nor integrity.signing_key_pkcs11_label is set: a drill \
             report must be signed",
        )?;
    let seed = match args.seed {
        Some(seed) => seed,
        None => crate::verify::random_seed()?,
    };
    let started_at = now_micros();
    let keys = DataKeys::from_config(store.clone(), &config.shared.keys).await?;
    let files = committed_files(store.clone(), &config.shared.kafka.topic).await?;
    let token = args.connection.token().await?;
    let mut client = RestoreServiceClient::new(channel(&args.restorer).await?);

    let tenants: Vec<String> = if args.tenants.is_empty() {
        let mut tenants: Vec<String> = files.by_tenant.keys().cloned().collect();
        tenants.sort();
        tenants
    } else {
        args.tenants.clone()
    };
    let mut sample = Vec::new();
    for tenant in &tenants {
        let listed = client
            .list_conversations(authorized(
                ListConversationsRequest {
                    tenant_id: tenant.clone(),
                },
                &token,
            )?)
            .await
            .map_err(|status| {
                anyhow::anyhow!("listing {tenant}'s conversations: {}", status.message())
            })?
            .into_inner();
        let mut ids: Vec<String> = listed
            .conversations
            .into_iter()
            .map(|summary| summary.conversation_id)
            .collect();
        ids.sort_by_key(|id| sha256_hex(format!("{seed}/{tenant}/{id}").as_bytes()));
        sample.extend(
            ids.into_iter()
                .take(args.per_tenant)
                .map(|id| (tenant.clone(), id)),
        );
    }

    let bar = (std::io::stderr().is_terminal() && !args.json).then(|| {
        ProgressBar::new(sample.len() as u64).with_style(
            ProgressStyle::with_template("drilling {bar:30} {pos}/{len} conversations {msg}")
                .expect("a valid progress template"),
        )
    });
    let mut conversations = Vec::with_capacity(sample.len());
    for (tenant, conversation) in sample {
        if let Some(bar) = &bar {
            bar.set_message(format!("{tenant}/{conversation}"));
        }
        conversations.push(
            drill_conversation(
                &mut client,
                &token,
                store.as_ref(),
                &keys,
                &files,
                &tenant,
                &conversation,
            )
            .await,
        );
        if let Some(bar) = &bar {
            bar.inc(1);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    // The chains, key records and log, without fetching the files again.
    let trust = LogTrust {
        keys: trusted.clone(),
        kept_checkpoints: Vec::new(),
        witness: None,
    };
    let checked = verify_archive(
        store.clone(),
        &trust,
        Sampling::Sample { files: 0, seed },
        |_| {},
    )
    .await?;
    let mut archive_problems: Vec<String> = checked
        .problems
        .iter()
        .map(|problem| serde_json::to_string(problem).unwrap_or_default())
        .collect();
    if !checked.log.signatures_checked {
        archive_problems
            .push("no integrity.trusted_keys: the checkpoints' signatures were not checked".into());
    }
    let passed = archive_problems.is_empty() && conversations.iter().all(|c| c.passed);
    let report = DrillReport {
        started_at_micros: started_at,
        finished_at_micros: now_micros(),
        restorer: args.restorer.clone(),
        seed,
        conversations,
        archive_problems,
        checkpoint_tree_size: checked.log.tree_size,
        passed,
    };
    let writer = format!("drill-{}", chatvault_core::random_hex(4)?);
    let path = commit_report(store, signing_key, &writer, &report).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", summary(&report));
        println!("signed report committed: {path}");
    }
    anyhow::ensure!(report.passed, "the drill FAILED");
    Ok(())
}

/// The configuration: `-c`, else the standalone data directory.
fn load(args: &DrillArgs) -> anyhow::Result<Config> {
    if args.config.is_some() {
        return Ok(Config::load(args.config.as_deref())?);
    }
    let mut config = Config::load(None)?;
    let dir = args.connection.data_dir();
    crate::checkpoint::use_data_dir(&mut config, dir)?;
    config.shared.keys.keyring_path = dir.join("keyring.json");
    Ok(config)
}

/// The committed chat-event files per tenant, read from the manifest chains (every link checked).
struct CommittedFiles {
    by_tenant: HashMap<String, Vec<ManifestFile>>,
}

async fn committed_files(
    store: Arc<dyn ObjectStore>,
    topic: &str,
) -> anyhow::Result<CommittedFiles> {
    let mut by_tenant: HashMap<String, Vec<ManifestFile>> = HashMap::new();
    if topics(store.as_ref()).await?.iter().any(|t| t == topic) {
        let chains = ChainReader::new(store, topic);
        for partition in chains.partitions().await? {
            // A broken chain is reported by the archive check; its verified prefix is still drilled. Files
            // that rewrites superseded are no longer the archive's.
            for (_, file) in chains.chain_files(partition).await.live {
                by_tenant
                    .entry(file.tenant_id.clone())
                    .or_default()
                    .push(file);
            }
        }
    }
    Ok(CommittedFiles { by_tenant })
}

async fn drill_conversation(
    client: &mut RestoreServiceClient<tonic::transport::Channel>,
    token: &str,
    store: &dyn ObjectStore,
    keys: &DataKeys,
    files: &CommittedFiles,
    tenant: &str,
    conversation: &str,
) -> DrilledConversation {
    let mut drilled = DrilledConversation {
        tenant_id: tenant.into(),
        conversation_id: conversation.into(),
        restored_events: 0,
        archived_events: 0,
        files: Vec::new(),
        restore_millis: 0,
        reread_millis: 0,
        passed: false,
        detail: String::new(),
    };
    let started = Instant::now();
    let restored = restore(client, token, tenant, conversation).await;
    drilled.restore_millis = started.elapsed().as_millis() as u64;
    let started = Instant::now();
    let digest = conversation_digest(tenant, conversation);
    let candidates: Vec<&ManifestFile> = files
        .by_tenant
        .get(tenant)
        .map(|files| {
            files
                .iter()
                .filter(|file| file.conversation_digests.contains(&digest))
                .collect()
        })
        .unwrap_or_default();
    drilled.files = candidates.iter().map(|file| file.path.clone()).collect();
    let reread = reread(store, keys, &candidates, tenant, conversation).await;
    drilled.reread_millis = started.elapsed().as_millis() as u64;
    let (restored, archived) = match (restored, reread) {
        (_, Err(error)) => {
            drilled.detail = format!("{error:#}");
            return drilled;
        }
        (Err(error), Ok(archived)) => {
            drilled.archived_events = archived.len() as u64;
            drilled.detail = format!("the restore failed: {error:#}");
            return drilled;
        }
        (Ok(restored), Ok(archived)) => (restored, archived),
    };
    drilled.restored_events = restored.len() as u64;
    drilled.archived_events = archived.len() as u64;
    let first_difference = restored.iter().zip(&archived).position(|(a, b)| a != b);
    drilled.detail = match (first_difference, restored.len() == archived.len()) {
        (None, true) => String::new(),
        (Some(at), _) => format!(
            "event {at} ({}) differs between the restore and the files",
            archived[at].event_id
        ),
        (None, false) => format!(
            "the restorer returned {} event(s), the files hold {}",
            restored.len(),
            archived.len()
        ),
    };
    drilled.passed = drilled.detail.is_empty();
    drilled
}

/// The conversation's archived events as the restorer returns them.
async fn restore(
    client: &mut RestoreServiceClient<tonic::transport::Channel>,
    token: &str,
    tenant: &str,
    conversation: &str,
) -> anyhow::Result<Vec<ChatEvent>> {
    let mut stream = client
        .get_conversation(authorized(
            GetConversationRequest {
                tenant_id: tenant.into(),
                conversation_id: conversation.into(),
                include_events: true,
                ..Default::default()
            },
            token,
        )?)
        .await
        .map_err(|status| anyhow::anyhow!("{:?}: {}", status.code(), status.message()))?
        .into_inner();
    let mut events = Vec::new();
    while let Some(item) = stream
        .message()
        .await
        .map_err(|status| anyhow::anyhow!("{:?}: {}", status.code(), status.message()))?
    {
        if let Some(Item::ArchivedEvent(event)) = item.item {
            events.push(event);
        }
    }
    Ok(events)
}

/// The conversation's events read straight from its files: each fetched and checked against its manifest
/// entry, decrypted with its data key, copies collapsed to the first archived, in time order. Deliberately
/// not the restorer's code (`reader::Collapsed`, `Restorer::conversation_events`): the drill compares the
/// restorer against an independent reading of the documented format, so a bug shared by both would hide.
async fn reread(
    store: &dyn ObjectStore,
    keys: &DataKeys,
    files: &[&ManifestFile],
    tenant: &str,
    conversation: &str,
) -> anyhow::Result<Vec<ChatEvent>> {
    let mut unique: HashMap<String, ArchivedEvent> = HashMap::new();
    for file in files {
        let bytes = store
            .get(&Path::from(file.path.as_str()))
            .await
            .with_context(|| format!("archive file {}", file.path))?
            .bytes()
            .await?;
        anyhow::ensure!(
            bytes.len() as u64 == file.bytes && sha256_hex(&bytes) == file.sha256,
            "archive file {} is not what its manifest committed (size or SHA-256 differ)",
            file.path
        );
        let key = keys
            .get_for_file(tenant, &file.key_scope, &file.key_period, &file.dek_id)
            .await
            .with_context(|| format!("the data key of archive file {}", file.path))?;
        let events = decode_file(bytes, &key, Some(conversation))
            .with_context(|| format!("decoding archive file {}", file.path))?;
        for event in events {
            match unique.entry(event.record.event_id.clone()) {
                Entry::Vacant(slot) => {
                    slot.insert(event);
                }
                Entry::Occupied(mut slot) => {
                    let kept = slot.get();
                    if (event.kafka_partition, event.kafka_offset)
                        < (kept.kafka_partition, kept.kafka_offset)
                    {
                        slot.insert(event);
                    }
                }
            }
        }
    }
    let mut events: Vec<ArchivedEvent> = unique.into_values().collect();
    events.sort_by_key(|e| {
        (
            e.record.occurred_at_micros,
            e.kafka_partition,
            e.kafka_offset,
        )
    });
    Ok(events.into_iter().map(|event| event.record).collect())
}

fn summary(report: &DrillReport) -> String {
    let mut out = format!(
        "drill of {} conversation(s) through {} (seed {}):\n",
        report.conversations.len(),
        report.restorer,
        report.seed
    );
    for drilled in &report.conversations {
        out.push_str(&format!(
            "  {} {}/{}: {} restored, {} in {} file(s); restore {} ms, re-read {} ms{}\n",
            if drilled.passed { "ok  " } else { "FAIL" },
            drilled.tenant_id,
            drilled.conversation_id,
            drilled.restored_events,
            drilled.archived_events,
            drilled.files.len(),
            drilled.restore_millis,
            drilled.reread_millis,
            if drilled.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", drilled.detail)
            }
        ));
    }
    out.push_str(&format!(
        "  transparency log: newest checkpoint covers {} manifest(s)\n",
        report.checkpoint_tree_size
    ));
    for problem in &report.archive_problems {
        out.push_str(&format!("  PROBLEM: {problem}\n"));
    }
    out.push_str(if report.passed {
        "passed\n"
    } else {
        "FAILED\n"
    });
    out
}

async fn history(
    store: Arc<dyn ObjectStore>,
    trusted: &[VerifierKey],
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !trusted.is_empty(),
        "no integrity.trusted_keys: the reports' signatures cannot be checked"
    );
    let reports = read_reports(store, trusted).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    for stored in &reports {
        let report = &stored.report;
        let failed = report.conversations.iter().filter(|c| !c.passed).count();
        println!(
            "{} {} {} conversation(s), {failed} failed, {} archive problem(s), {:.1} s (signature verified; {})",
            chatvault_restorer::render::format_time(report.started_at_micros),
            if report.passed { "passed" } else { "FAILED" },
            report.conversations.len(),
            report.archive_problems.len(),
            (report.finished_at_micros - report.started_at_micros) as f64 / 1e6,
            stored.path
        );
    }
    if reports.is_empty() {
        println!("no drill has run yet");
    }
    Ok(())
}
