//! `chatvault keys rotate`, `rewrap`, `retire` and `shred`: operator commands run with the deployment's
//! configuration (its bucket and key providers), each recorded in the audit trail (on the configured Kafka)
//! before it acts. `rotate` makes a new key-encryption key current for a tenant (keyring; a KMS rotates in the
//! KMS); `rewrap` moves every data key record to its tenant's current KEK (see
//! `chatvault_archive::keys::DataKeys::rewrap`).
//!
//! `chatvault keys export`: a tenant's data keys for standard readers, from the restorer's
//! `chatvault.v1.KeyService` (the `key_export` role; every handout is recorded in the audit trail). Output:
//! one JSON object per month (`--format json`, for pyarrow's `create_decryption_properties(footer_key=...)`
//! and scripts), or a DuckDB SQL script (`--format duckdb`) that registers the keys and defines the view
//! `events` over the months' files under `--archive`, with the setting filtered queries need.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use base64::Engine;
use chatvault_archive::keys::{DataKeys, Providers, RewrapOutcome};
use chatvault_config::Config;
use chatvault_core::audit::{Auditor, CallSource};
use chatvault_core::storage::object_store_from_config;
use chatvault_proto::v1::key_service_client::KeyServiceClient;
use chatvault_proto::v1::{ExportDataKeysRequest, ExportedDataKey};
use clap::{Args, Subcommand, ValueEnum};

use crate::client::{Connection, authorized, channel};

#[derive(Args, Debug)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Print the data keys of a tenant's months (for DuckDB or pyarrow). Asks the restorer, which needs the
    /// `key_export` role and records the handout; treat the output as a secret.
    Export(ExportArgs),
    /// Make a new key-encryption key current for a tenant (keyring provider). New data keys are wrapped
    /// under it; existing ones stay readable under the old one until `keys rewrap`.
    Rotate(RotateArgs),
    /// Wrap every data key record again under its tenant's current key-encryption key (after a rotation, a
    /// new KMS key, or a move from the keyring to a KMS). Data files are not rewritten.
    Rewrap(RewrapArgs),
    /// Destroy an old key-encryption key version once no data key record needs it (after `keys rewrap`):
    /// the keyring deletes it, the HSM destroys it; a KMS key is disabled in the KMS instead.
    Retire(RetireArgs),
    /// Erase a tenant's data, or one month of it, by destroying its data keys (crypto-shredding): every copy
    /// of the files, backups included, becomes unreadable. Refused while a legal hold covers the data.
    /// `--dry-run` lists what would become unreadable; otherwise asks for the tenant id as confirmation on a
    /// terminal, or needs `--yes`.
    Shred(ShredArgs),
}

#[derive(Args, Debug)]
pub struct RetireArgs {
    #[command(flatten)]
    operator: OperatorArgs,
    #[arg(long)]
    tenant: String,
    /// The key-encryption key version, as key records name it (`kek_id`).
    #[arg(long)]
    kek: String,
}

#[derive(Args, Debug)]
pub struct ShredArgs {
    #[command(flatten)]
    operator: OperatorArgs,
    #[arg(long)]
    tenant: String,
    /// Only this month (`yyyy-mm`). Without --period and --scope: all of the tenant's data, and its
    /// key-encryption keys.
    #[arg(long)]
    period: Option<String>,
    /// Only this key scope (`keys.scopes`).
    #[arg(long)]
    scope: Option<String>,
    /// Why (recorded in the erasure records and the audit trail), e.g. a ticket or request id.
    #[arg(long)]
    reason: Option<String>,
    /// Show what would be erased and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
}

#[derive(Args, Debug)]
pub struct OperatorArgs {
    /// The deployment's configuration (storage, keys, kafka for the audit record); CHATVAULT__* variables
    /// override it.
    #[arg(long, short = 'c', env = "CHATVAULT_CONFIG")]
    config: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct RotateArgs {
    #[command(flatten)]
    operator: OperatorArgs,
    #[arg(long)]
    tenant: String,
}

#[derive(Args, Debug)]
pub struct RewrapArgs {
    #[command(flatten)]
    operator: OperatorArgs,
    /// Only this tenant's records (default: every tenant's, the audit trail's included).
    #[arg(long)]
    tenant: Option<String>,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    connection: Connection,
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    restorer: String,
    #[arg(long)]
    tenant: String,
    /// The first month, `yyyy-mm`.
    #[arg(long)]
    period: String,
    /// The last month, `yyyy-mm` (default: --period).
    #[arg(long)]
    to_period: Option<String>,
    /// A key scope (`keys.scopes`) instead of the tenant's default scope.
    #[arg(long)]
    scope: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
    /// With `--format duckdb`: the archive root the script reads (a directory, or an `s3://` URL with
    /// DuckDB's httpfs configured).
    #[arg(long)]
    archive: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per month: tenant_id, period, dek_id, key_base64, key_hex.
    Json,
    /// A DuckDB SQL script defining the view `events`.
    Duckdb,
}

pub async fn keys(args: KeysArgs) -> anyhow::Result<()> {
    match args.command {
        KeysCommand::Export(args) => export(args).await,
        KeysCommand::Rotate(args) => rotate(args).await,
        KeysCommand::Rewrap(args) => rewrap(args).await,
        KeysCommand::Retire(args) => retire(args).await,
        KeysCommand::Shred(args) => shred(args).await,
    }
}

fn check_tenant(tenant: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        chatvault_core::event::is_valid_tenant_id(tenant)
            || tenant == chatvault_archive::kind::AUDIT_KEY_SCOPE,
        "--tenant {tenant:?} is not a tenant id (1 to 64 characters of a-z, 0-9, '-' and '_')"
    );
    Ok(())
}

/// The local user and host, for the audit record of an operator command.
fn operator_name() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown-host".into());
    format!("operator:{user}@{host}")
}

/// Records that `action` is about to run (durably, on the configured audit topic); the command does not
/// act unless this succeeds.
async fn record_operator_action(
    config: &Config,
    action: &str,
    tenant: &str,
    items: u64,
) -> anyhow::Result<()> {
    record_operator_action_with(config, action, tenant, items, "").await
}

/// [`record_operator_action`] with what it acts on (`query` of the audit record).
async fn record_operator_action_with(
    config: &Config,
    action: &str,
    tenant: &str,
    items: u64,
    query: &str,
) -> anyhow::Result<()> {
    let sink = chatvault_kafka::audit::KafkaAuditSink::connect(&config.shared.kafka)?;
    let mut call = Auditor::new("cli", Arc::new(sink)).call(action, &CallSource::default());
    call.tenant(tenant).operator(&operator_name()).query(query);
    call.allowed(items, 0).await.with_context(|| {
        format!(
            "recording {action} in the audit trail (Kafka {}); nothing was done",
            config.shared.kafka.brokers
        )
    })
}

async fn rotate(args: RotateArgs) -> anyhow::Result<()> {
    check_tenant(&args.tenant)?;
    let config = Config::load(args.operator.config.as_deref())?;
    let providers = Providers::from_config(&config.shared.keys).await?;
    let provider = providers.of(&args.tenant).clone();
    let previous = provider.current_kek_id(&args.tenant).await?;
    record_operator_action(&config, "keys.rotate", &args.tenant, 1).await?;
    let current = provider.rotate(&args.tenant).await?;
    if args.operator.json {
        println!(
            "{}",
            serde_json::json!({
                "tenant_id": args.tenant,
                "provider": provider.kind(),
                "previous_kek_id": previous,
                "current_kek_id": current,
            })
        );
    } else {
        println!(
            "tenant {}: key-encryption key {current} is now current ({} provider; was {previous}).\n\
             New data keys are wrapped under it. Run `chatvault keys rewrap --tenant {}` to move existing \
             data key records to it before retiring {previous}.",
            args.tenant,
            provider.kind(),
            args.tenant
        );
    }
    Ok(())
}

async fn rewrap(args: RewrapArgs) -> anyhow::Result<()> {
    if let Some(tenant) = &args.tenant {
        check_tenant(tenant)?;
    }
    let config = Config::load(args.operator.config.as_deref())?;
    let store = object_store_from_config(&config.shared.storage)?;
    let keys = DataKeys::from_config(store, &config.shared.keys).await?;
    record_operator_action(
        &config,
        "keys.rewrap",
        args.tenant.as_deref().unwrap_or_default(),
        0,
    )
    .await?;
    let show_progress = std::io::stderr().is_terminal() && !args.operator.json;
    let mut seen = 0usize;
    let report = keys
        .rewrap(args.tenant.as_deref(), |entry| {
            seen += 1;
            if show_progress {
                eprint!(
                    "\rrewrapping: {seen} key record(s) examined ({})",
                    entry.record
                );
            }
        })
        .await?;
    if show_progress {
        eprintln!();
    }
    if args.operator.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for entry in &report.records {
            match &entry.outcome {
                RewrapOutcome::Rewrapped {
                    from_provider,
                    from_kek,
                    to_provider,
                    to_kek,
                } => println!(
                    "  rewrapped {}: {from_provider} {from_kek} -> {to_provider} {to_kek}",
                    entry.record
                ),
                RewrapOutcome::Failed { error } => {
                    println!("  FAILED    {}: {error}", entry.record)
                }
                RewrapOutcome::Current => {}
            }
        }
        println!(
            "{} key record(s): {} rewrapped, {} already current, {} failed",
            report.records.len(),
            report.rewrapped,
            report.current,
            report.failed
        );
    }
    anyhow::ensure!(
        report.failed == 0,
        "{} key record(s) could not be rewrapped (they still open under their old key); fix the cause and run \
         rewrap again",
        report.failed
    );
    Ok(())
}

async fn retire(args: RetireArgs) -> anyhow::Result<()> {
    check_tenant(&args.tenant)?;
    let config = Config::load(args.operator.config.as_deref())?;
    let store = object_store_from_config(&config.shared.storage)?;
    let keys = DataKeys::from_config(store, &config.shared.keys).await?;
    record_operator_action_with(
        &config,
        "keys.retire",
        &args.tenant,
        1,
        &format!("kek={}", args.kek),
    )
    .await?;
    let done = keys.retire_kek(&args.tenant, &args.kek).await?;
    if args.operator.json {
        println!(
            "{}",
            serde_json::json!({"tenant_id": args.tenant, "kek_id": args.kek, "done": done})
        );
    } else {
        println!("tenant {}: {done}", args.tenant);
    }
    Ok(())
}

async fn shred(args: ShredArgs) -> anyhow::Result<()> {
    check_tenant(&args.tenant)?;
    if let Some(period) = &args.period {
        anyhow::ensure!(
            chatvault_core::time::Date::parse_iso(&format!("{period}-01")).is_some(),
            "--period {period:?} is not a month (yyyy-mm)"
        );
    }
    let config = Config::load(args.operator.config.as_deref())?;
    let store = object_store_from_config(&config.shared.storage)?;
    let keys = DataKeys::from_config(store, &config.shared.keys).await?;
    if let Some(scope) = &args.scope {
        anyhow::ensure!(
            chatvault_core::event::is_valid_tenant_id(scope),
            "--scope {scope:?} is not a key scope name (1 to 64 characters of a-z, 0-9, '-' and '_')"
        );
    }
    let plan = keys
        .plan_shred(&args.tenant, args.scope.as_deref(), args.period.as_deref())
        .await?;
    let what = match (&plan.scope, &plan.period) {
        (Some(scope), Some(period)) => {
            format!(
                "key scope {scope} of tenant {} for {period}",
                plan.tenant_id
            )
        }
        (Some(scope), None) => format!("key scope {scope} of tenant {}", plan.tenant_id),
        (None, Some(period)) => format!("tenant {} for {period}", plan.tenant_id),
        (None, None) => format!("all data of tenant {}", plan.tenant_id),
    };
    if args.dry_run || !args.operator.json {
        let out = &mut std::io::stdout();
        use std::io::Write as _;
        writeln!(
            out,
            "shred {what}{}:",
            if args.dry_run { " (dry run)" } else { "" }
        )?;
        for target in &plan.targets {
            writeln!(
                out,
                "  {}{}: data key {} ({}): {} file(s), {:.1} MB become unreadable",
                if target.scope.is_empty() {
                    String::new()
                } else {
                    format!("scope {} ", target.scope)
                },
                target.period,
                target.dek_id,
                target.key_record,
                target.files,
                target.bytes as f64 / 1e6
            )?;
        }
        writeln!(out, "  key-encryption keys: {}", plan.key_encryption_keys)?;
        for hold in &plan.holds {
            writeln!(
                out,
                "  REFUSED: legal hold {} ({}) covers this data",
                hold.hold_id, hold.matter
            )?;
        }
    }
    if args.dry_run {
        if args.operator.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        }
        return Ok(());
    }
    anyhow::ensure!(
        !plan.targets.is_empty(),
        "nothing to shred: {what} has no data key"
    );
    if let Some(hold) = plan.holds.first() {
        anyhow::bail!(
            "refused: legal hold {} ({}) covers {what}; release it before erasing",
            hold.hold_id,
            hold.matter
        );
    }
    let reason = args
        .reason
        .clone()
        .context("--reason is required: say why (a ticket or request id); it is recorded")?;
    if !args.yes {
        anyhow::ensure!(
            std::io::stdin().is_terminal(),
            "not a terminal: pass --yes to confirm the erasure of {what}"
        );
        eprint!(
            "This destroys the data keys above: {what} can never be read again, from any copy.\n\
             Type the tenant id ({}) to confirm: ",
            plan.tenant_id
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        anyhow::ensure!(
            answer.trim() == plan.tenant_id,
            "not confirmed; nothing was erased"
        );
    }
    let acts_on = format!(
        "{}{} reason={reason}",
        plan.scope
            .as_deref()
            .map(|scope| format!("scope={scope} "))
            .unwrap_or_default(),
        plan.period
            .as_deref()
            .map(|period| format!("period={period}"))
            .unwrap_or_else(|| "all periods".into())
    );
    record_operator_action_with(
        &config,
        "keys.shred",
        &plan.tenant_id,
        plan.targets.len() as u64,
        &acts_on,
    )
    .await?;
    let show_progress = std::io::stderr().is_terminal() && !args.operator.json;
    let report = keys
        .shred(&plan, &operator_name(), &reason, |erased| {
            if show_progress {
                eprintln!("  erased {} ({})", erased.period, erased.dek_id);
            }
        })
        .await?;
    if args.operator.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "erased {what}: {} data key(s) destroyed; key-encryption keys: {}",
            report.erased.len(),
            report.key_encryption_keys
        );
    }
    Ok(())
}

async fn export(args: ExportArgs) -> anyhow::Result<()> {
    if args.format == Format::Duckdb && args.archive.is_none() {
        anyhow::bail!("--format duckdb needs --archive <archive root> for the script's file paths");
    }
    let token = args.connection.token().await?;
    let mut client = KeyServiceClient::new(channel(&args.restorer).await?);
    let keys = client
        .export_data_keys(authorized(
            ExportDataKeysRequest {
                tenant_id: args.tenant.clone(),
                from_period: args.period.clone(),
                to_period: args.to_period.clone().unwrap_or_default(),
                key_scope: args.scope.clone().unwrap_or_default(),
            },
            &token,
        )?)
        .await
        .map_err(|status| {
            anyhow::anyhow!(
                "key export failed: {:?}: {}",
                status.code(),
                status.message()
            )
        })
        .context("asking the restorer for data keys")?
        .into_inner()
        .keys;
    if keys.is_empty() {
        anyhow::bail!(
            "tenant {} has no archived data (and so no data key) in {}..{}",
            args.tenant,
            args.period,
            args.to_period.as_deref().unwrap_or(&args.period)
        );
    }
    match args.format {
        Format::Json => {
            for key in &keys {
                println!(
                    "{}",
                    serde_json::json!({
                        "tenant_id": key.tenant_id,
                        "key_scope": key.key_scope,
                        "period": key.period,
                        "dek_id": key.dek_id,
                        "key_base64": base64::engine::general_purpose::STANDARD.encode(&key.key),
                        "key_hex": hex::encode(&key.key),
                    })
                );
            }
        }
        Format::Duckdb => print!(
            "{}",
            duckdb_script(args.archive.as_deref().unwrap_or_default(), &keys)
        ),
    }
    eprintln!(
        "{} data key(s) of tenant {} handed out (recorded in the audit trail)",
        keys.len(),
        args.tenant
    );
    Ok(())
}

/// A DuckDB script over `keys`' months of the archive at `root`: one `PRAGMA add_parquet_key` and one
/// `read_parquet` per month, united as the view `events` with the Hive columns `tenant` and `date`. Filter
/// pushdown is switched off: DuckDB 2.0.1 fails any `WHERE` it pushes into an encrypted `read_parquet`
/// ("Computed AES tag differs from read AES tag") and evaluates the same filters correctly after the scan.
fn duckdb_script(root: &str, keys: &[ExportedDataKey]) -> String {
    let quoted = |text: &str| text.replace('\'', "''");
    let root = root.trim_end_matches('/');
    let mut script = String::from("SET disabled_optimizers = 'filter_pushdown';\n");
    let mut selects = Vec::new();
    for key in keys {
        // Tenant ids and periods are checked by the service ([a-z0-9_-], yyyy-mm): safe in a key name.
        let name = if key.key_scope.is_empty() {
            format!("chatvault_{}_{}", key.tenant_id, key.period)
        } else {
            format!(
                "chatvault_{}_{}_{}",
                key.tenant_id, key.key_scope, key.period
            )
        }
        .replace('-', "_");
        // Each scope's files carry its name (`s-<scope>-`); the default scope's start with `p`.
        let files = if key.key_scope.is_empty() {
            "p*.parquet".to_string()
        } else {
            format!("s-{}-p*.parquet", key.key_scope)
        };
        script.push_str(&format!(
            "PRAGMA add_parquet_key('{name}', '{}');\n",
            base64::engine::general_purpose::STANDARD.encode(&key.key)
        ));
        let pattern = format!(
            "{root}/events/tenant={}/date={}-*/{files}",
            key.tenant_id, key.period
        );
        selects.push(format!(
            "SELECT * FROM read_parquet('{}', encryption_config = {{footer_key: '{name}'}}, hive_partitioning = true)",
            quoted(&pattern)
        ));
    }
    script.push_str("CREATE OR REPLACE VIEW events AS\n  ");
    script.push_str(&selects.join("\n  UNION ALL BY NAME\n  "));
    script.push_str(";\n");
    script
}
