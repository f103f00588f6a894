//! `chatvault keys export`: a tenant's data keys for standard readers, from the restorer's
//! `chatvault.v1.KeyService` (the `key_export` role; every handout is recorded in the audit trail). Output:
//! one JSON object per month (`--format json`, for pyarrow's `create_decryption_properties(footer_key=...)`
//! and scripts), or a DuckDB SQL script (`--format duckdb`) that registers the keys and defines the view
//! `events` over the months' files under `--archive`, with the setting filtered queries need.

use anyhow::Context;
use base64::Engine;
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
    let KeysCommand::Export(args) = args.command;
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
        let name = format!("chatvault_{}_{}", key.tenant_id, key.period).replace('-', "_");
        script.push_str(&format!(
            "PRAGMA add_parquet_key('{name}', '{}');\n",
            base64::engine::general_purpose::STANDARD.encode(&key.key)
        ));
        let pattern = format!(
            "{root}/events/tenant={}/date={}-*/*.parquet",
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
