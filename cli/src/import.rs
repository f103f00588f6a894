//! `chatvault import`: back-fill history from the platforms' exports through a running gateway (an `ingest`
//! token), resumable from a checkpoint file, with a progress bar on a terminal and a summary at the end.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use chatvault_import::checkpoint::Checkpoint;
use chatvault_import::gateway::Gateway;
use chatvault_import::mattermost::MattermostExport;
use chatvault_import::slack_export::{Options, SlackExport};
use chatvault_import::teams;
use chatvault_import::{Source, Summary};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::client::{Connection, channel};

#[derive(Args, Debug)]
pub struct ImportArgs {
    #[command(subcommand)]
    command: ImportCommand,
}

#[derive(Subcommand, Debug)]
enum ImportCommand {
    /// A Slack Export Data ZIP (standard or corporate): channels, private channels, DMs and group DMs,
    /// threads, edits, tombstones, reactions, files (as attachment metadata), joins and leaves, bots.
    SlackExport(SlackExportArgs),
    /// A Mattermost bulk export (`mmctl export create`): the .jsonl, or the ZIP holding it. Posts, replies,
    /// edits, reactions, direct messages, joins and leaves; the format has no ids, so conversations are
    /// `<team>/<channel>` and senders usernames.
    Mattermost(MattermostArgs),
    /// Microsoft Teams through Microsoft Graph's export API (`getAllMessages`): the chats of the given users
    /// and the channels of the given teams, for a time window, as an app with application permissions
    /// (Chat.Read.All, ChannelMessage.Read.All) authenticated by client secret or certificate.
    Teams(Box<TeamsArgs>),
}

#[derive(Args)]
struct TeamsArgs {
    /// The Microsoft Entra tenant (directory) id of the organisation.
    #[arg(long)]
    directory: String,
    /// The app registration's application (client) id.
    #[arg(long)]
    client_id: String,
    /// The app's client secret.
    #[arg(long, env = "CHATVAULT_TEAMS_CLIENT_SECRET", hide_env_values = true)]
    client_secret: Option<String>,
    /// A file holding the app's client secret.
    #[arg(long, conflicts_with = "client_secret")]
    client_secret_file: Option<PathBuf>,
    /// The app's certificate (PEM), instead of a secret; with --certificate-key.
    #[arg(long, requires = "certificate_key", conflicts_with_all = ["client_secret", "client_secret_file"])]
    certificate: Option<PathBuf>,
    /// The certificate's private key (PKCS#8 PEM).
    #[arg(long, requires = "certificate")]
    certificate_key: Option<PathBuf>,
    /// A user whose chats are exported (repeatable).
    #[arg(long = "user")]
    users: Vec<String>,
    /// A file of user ids, one per line.
    #[arg(long)]
    users_file: Option<PathBuf>,
    /// A team whose channels are exported (repeatable).
    #[arg(long = "team")]
    teams: Vec<String>,
    /// Messages last modified after this time (RFC 3339).
    #[arg(long)]
    from: String,
    /// Messages last modified before this time (RFC 3339; default: now).
    #[arg(long)]
    to: Option<String>,
    /// Graph's payment model for the export APIs: A (security and compliance licences) or B; none is
    /// evaluation mode, with its limits.
    #[arg(long, default_value = "")]
    model: String,
    /// The Microsoft identity platform (a national cloud's, or a test server).
    #[arg(long, default_value = "https://login.microsoftonline.com")]
    authority: String,
    /// Microsoft Graph's base URL.
    #[arg(long, default_value = "https://graph.microsoft.com")]
    graph: String,
    /// Requests per second to Graph at most (Graph allows 200 per app and tenant).
    #[arg(long, default_value_t = 20.0)]
    max_requests_per_second: f64,
    #[command(flatten)]
    common: Common,
}

impl std::fmt::Debug for TeamsArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeamsArgs")
            .field("directory", &self.directory)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("users", &self.users)
            .field("teams", &self.teams)
            .finish_non_exhaustive()
    }
}

#[derive(Args, Debug)]
struct MattermostArgs {
    /// The export: `.jsonl`, or the ZIP `mmctl export download` gives.
    export: PathBuf,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct Common {
    #[command(flatten)]
    connection: Connection,
    /// The gateway's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    gateway: String,
    /// The tenant the history belongs to (the token needs the `ingest` role for it).
    #[arg(long)]
    tenant: String,
    /// Where the progress of this import is kept (default: beside the export, `<export>.chatvault-import`).
    /// Running the same import again resumes from it.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Most events per gateway call.
    #[arg(long, default_value_t = 500)]
    batch_events: usize,
    /// How long an unavailable or overloaded gateway is retried before the import stops (it can be resumed).
    #[arg(long, default_value = "10m", value_parser = chatvault_core::duration::parse)]
    max_retry_time: Duration,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct SlackExportArgs {
    /// The export ZIP.
    export: PathBuf,
    /// The Slack team id (`T…`) of the exported workspace, as in the Events API's `team_id` (default: the
    /// team most users in users.json belong to).
    #[arg(long)]
    workspace: Option<String>,
    #[command(flatten)]
    common: Common,
}

pub async fn import(args: ImportArgs) -> anyhow::Result<()> {
    match args.command {
        ImportCommand::SlackExport(args) => {
            let mut export = SlackExport::open(
                &args.export,
                Options {
                    tenant: args.common.tenant.clone(),
                    workspace: args.workspace,
                },
            )?;
            let checkpoint = checkpoint_path(&args.common, &args.export);
            run(&mut export, &args.common, checkpoint).await
        }
        ImportCommand::Teams(args) => teams(*args).await,
        ImportCommand::Mattermost(args) => {
            let mut export = MattermostExport::open(&args.export, &args.common.tenant)?;
            let checkpoint = checkpoint_path(&args.common, &args.export);
            run(&mut export, &args.common, checkpoint).await
        }
    }
}

async fn teams(args: TeamsArgs) -> anyhow::Result<()> {
    let read = |path: &PathBuf, what: &str| {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the {what} {}", path.display()))
    };
    let credential = match (
        &args.client_secret,
        &args.client_secret_file,
        &args.certificate,
        &args.certificate_key,
    ) {
        (Some(secret), _, _, _) => teams::Credential::Secret(secret.clone()),
        (None, Some(file), _, _) => {
            teams::Credential::Secret(read(file, "client secret file")?.trim().to_string())
        }
        (None, None, Some(certificate), Some(key)) => teams::Credential::Certificate {
            certificate_pem: read(certificate, "certificate")?,
            key_pem: read(key, "certificate key")?,
        },
        _ => anyhow::bail!(
            "the app needs a credential: --client-secret-file, CHATVAULT_TEAMS_CLIENT_SECRET, or --certificate with --certificate-key"
        ),
    };
    let mut users = args.users.clone();
    if let Some(file) = &args.users_file {
        users.extend(
            read(file, "users file")?
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(str::to_string),
        );
    }
    let to = args.to.clone().unwrap_or_else(|| {
        chatvault_core::time::format_time(chatvault_core::time::now_micros()).replacen(' ', "T", 1)
    });
    let mut export = teams::TeamsExport::new(teams::Options {
        tenant: args.common.tenant.clone(),
        directory: args.directory.clone(),
        client_id: args.client_id.clone(),
        credential,
        users,
        teams: args.teams.clone(),
        from: args.from.clone(),
        to,
        model: args.model.clone(),
        authority: args.authority.clone(),
        graph: args.graph.clone(),
        max_requests_per_second: args.max_requests_per_second,
        max_retry_time: args.common.max_retry_time,
    })?;
    let checkpoint = args.common.checkpoint.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "chatvault-import-teams-{}",
            &export.fingerprint()[..16]
        ))
    });
    run(&mut export, &args.common, checkpoint).await
}

/// `--checkpoint`, else `<export>.chatvault-import` beside the export.
fn checkpoint_path(common: &Common, export: &std::path::Path) -> PathBuf {
    common.checkpoint.clone().unwrap_or_else(|| {
        let mut path = export.as_os_str().to_owned();
        path.push(".chatvault-import");
        PathBuf::from(path)
    })
}

async fn run(source: &mut dyn Source, common: &Common, checkpoint: PathBuf) -> anyhow::Result<()> {
    let mut checkpoint = Checkpoint::open(
        &checkpoint,
        source.kind(),
        source.fingerprint(),
        &common.tenant,
    )?;
    let token = common.connection.token().await?;
    let mut gateway = Gateway::new(channel(&common.gateway).await?, &token)?;
    gateway.max_batch_events = common.batch_events.max(1);
    gateway.max_retry_time = common.max_retry_time;
    let bar = (std::io::stderr().is_terminal() && !common.json).then(|| {
        let bar = ProgressBar::new(source.units().len() as u64).with_style(
            ProgressStyle::with_template(
                "importing {bar:30} {pos}/{len} units, {msg} [{elapsed_precise}, {eta} left]",
            )
            .expect("a valid progress template"),
        );
        bar.set_position(checkpoint.units_done() as u64);
        bar
    });
    let stop = async {
        // Without a signal handler the stop never comes; the import then runs to its end.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let summary = chatvault_import::run(
        source,
        &common.tenant,
        &mut gateway,
        &mut checkpoint,
        stop,
        |summary| {
            if let Some(bar) = &bar {
                bar.set_position((summary.units_resumed + summary.units_imported) as u64);
                bar.set_message(format!("{} events", summary.events_imported));
            }
        },
    )
    .await
    .context("import stopped; running the same command again resumes from the checkpoint")?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if common.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    if summary.interrupted {
        anyhow::bail!(
            "interrupted; running the same command again resumes from {}",
            summary.checkpoint
        );
    }
    Ok(())
}

fn print_summary(summary: &Summary) {
    println!(
        "{} {} into tenant {}{}",
        summary.source,
        &summary.fingerprint[..summary.fingerprint.len().min(12)],
        summary.tenant,
        if summary.interrupted {
            " (interrupted)"
        } else {
            ""
        }
    );
    println!(
        "  units: {} of {} imported by this run, {} by earlier runs",
        summary.units_imported, summary.units_total, summary.units_resumed
    );
    println!(
        "  events: {} imported ({:.0}/s), {} in all runs; {} duplicates within the export sent once",
        summary.events_imported,
        summary.events_per_second,
        summary.events_imported_total,
        summary.duplicates_skipped
    );
    if summary.raw_payloads_dropped > 0 {
        println!(
            "  {} events archived without their raw payload (over the gateway's limit)",
            summary.raw_payloads_dropped
        );
    }
    if summary.retries > 0 {
        println!(
            "  {} gateway calls retried (overloaded or unavailable)",
            summary.retries
        );
    }
    for (reason, count) in &summary.skipped {
        println!("  skipped {count}: {reason}");
    }
    println!("  rejected: {}", summary.rejected.len());
    for rejection in &summary.rejected {
        println!(
            "    {} {}: {}",
            rejection.unit, rejection.item, rejection.reason
        );
    }
    println!("  checkpoint: {}", summary.checkpoint);
}
