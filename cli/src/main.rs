//! `chatvault`: one binary, a subcommand per role (`gateway`, `archiver`, `restorer`), `standalone` (all three
//! in one process on embedded defaults), and client commands (`login`, `logout`, `demo`, `restore`,
//! `conversations`, `keys`, `audit`, `verify`, `config check`).

mod audit;
mod checkpoint;
mod client;
mod credentials;
mod disposition;
mod doctor;
mod drill;
mod governance;
mod import;
mod keys;
mod login;
mod ops;
mod roles;
mod sample;
mod verify;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "chatvault",
    version,
    about = "Streaming, encrypted, exactly-once backup for enterprise chat"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct ConfigArgs {
    /// Configuration file (TOML; see config/chatvault.example.toml). CHATVAULT__SECTION__KEY variables override it.
    #[arg(long, short = 'c', env = "CHATVAULT_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the ingest gateway (gRPC ingest → Kafka).
    Gateway(ConfigArgs),
    /// Run an archiver worker (Kafka → encrypted Parquet on object storage).
    Archiver(ConfigArgs),
    /// Run the restorer (authorized reads of archived conversations).
    Restorer(ConfigArgs),
    /// Run gateway, archiver and restorer in one process on embedded defaults: librdkafka's in-process mock
    /// Kafka cluster (NOT durable), a local archive directory and a local keyring.
    Standalone(roles::StandaloneArgs),
    /// Sign in at the company's OpenID provider (OAuth 2.0 device authorization grant) for the client
    /// commands; the sign-in is kept in the user's configuration directory.
    Login(login::LoginArgs),
    /// Forget the sign-in of `chatvault login`.
    Logout,
    /// Send a sample conversation (thread, edit, deletion, reactions, membership) and print it restored.
    Demo(client::DemoArgs),
    /// Restore a conversation and print it as readable text (or JSON).
    Restore(client::RestoreArgs),
    /// List a tenant's archived conversations.
    Conversations(client::ConversationsArgs),
    /// Back-fill history from a platform's export through a running gateway (resumable, with a summary).
    Import(import::ImportArgs),
    /// Data-key operations for standard readers (DuckDB, pyarrow).
    Keys(keys::KeysArgs),
    /// Read a tenant's audit trail (who did what, when, from where, with what outcome).
    Audit(audit::AuditArgs),
    /// Retention policies of a tenant (the `policy` role): set, remove, list.
    Policy(governance::PolicyArgs),
    /// Legal holds of a tenant (the `hold` role): place, change, release, list.
    Hold(governance::HoldArgs),
    /// Disposition by retention policy (the `policy` role): plan what is due (a dry run), apply a plan by
    /// id, list plans and their signed reports.
    Retention(disposition::RetentionArgs),
    /// A data subject's erasure (the `policy` role): plan the removal of what they authored or what mentions
    /// them (held events are kept and listed), then apply the plan by id.
    Erase(disposition::EraseArgs),
    /// Check that the storage keeps the archive's promises: conditional creates, and with Object Lock the
    /// bucket's lock configuration, versioning and legal holds (probe objects, removed afterwards).
    Doctor(doctor::DoctorArgs),
    /// Verify a whole archive from the bucket alone: chains, files, key records, the signed transparency log.
    Verify(verify::VerifyArgs),
    /// Verify an exported conversation's evidence offline (`chatvault restore --evidence FILE`): every event
    /// a row of an archived file whose manifest a signed checkpoint covers.
    VerifyExport(verify::VerifyExportArgs),
    /// A restore drill: sample conversations per tenant, restore them through the restorer, re-read them from
    /// the Parquet files, compare, check the chains and the log, commit a signed report (`--history` lists them).
    Drill(drill::DrillArgs),
    /// The transparency log's signing key and checkpoints.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Configuration operations.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Load and validate a configuration (the file and CHATVAULT__ variables) without starting anything:
    /// unknown settings and invalid values are errors naming the setting.
    Check(ConfigArgs),
}

fn main() -> std::process::ExitCode {
    chatvault_core::storage::install_crypto_provider();
    let cli = Cli::parse();
    // Roles install their telemetry (configured logs, traces, metrics) once their configuration is loaded;
    // client commands only log, as text.
    let is_role = matches!(
        cli.command,
        Command::Gateway(_) | Command::Archiver(_) | Command::Restorer(_) | Command::Standalone(_)
    );
    if !is_role {
        chatvault_core::telemetry::init_logging();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Gateway(args) => roles::run_gateway(roles::load_config(&args.config)?).await,
            Command::Archiver(args) => roles::run_archiver(roles::load_config(&args.config)?).await,
            Command::Restorer(args) => roles::run_restorer(roles::load_config(&args.config)?).await,
            Command::Standalone(args) => roles::run_standalone(args).await,
            Command::Login(args) => login::login(args).await,
            Command::Logout => login::logout().await,
            Command::Demo(args) => client::demo(args).await,
            Command::Restore(args) => client::restore(args).await,
            Command::Conversations(args) => client::conversations(args).await,
            Command::Import(args) => import::import(args).await,
            Command::Keys(args) => keys::keys(args).await,
            Command::Audit(args) => audit::audit(args).await,
            Command::Policy(args) => governance::policy(args).await,
            Command::Hold(args) => governance::hold(args).await,
            Command::Retention(args) => disposition::retention(args).await,
            Command::Erase(args) => disposition::erase(args).await,
            Command::Doctor(args) => doctor::doctor(args).await,
            Command::Verify(args) => verify::verify(args).await,
            Command::VerifyExport(args) => verify::verify_export(args).await,
            Command::Checkpoint(args) => checkpoint::checkpoint(args).await,
            Command::Drill(args) => drill::drill(args).await,
            Command::Config(ConfigCommand::Check(args)) => {
                let config = roles::load_config(&args.config)?;
                chatvault_archive::tlog::note::VerifierKey::parse_all(
                    "integrity.trusted_keys",
                    &config.shared.integrity.trusted_keys,
                )?;
                for warning in &config.deprecated_settings {
                    eprintln!("warning: {warning}");
                }
                println!("configuration valid");
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
