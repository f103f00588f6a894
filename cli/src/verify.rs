//! `chatvault verify`: checks a whole archive from the bucket alone (no keys, no Kafka, no service), as an
//! auditor with read access would: every manifest chain, every committed file by size and SHA-256, every data
//! key record a file needs, the transparency log and its signed checkpoints (given the verifier key), and
//! what no manifest names (`chatvault_archive::verify`). `--sample N` hashes only a random sample of the
//! files of a very large archive (chains, key records and the log are still checked in full). A progress
//! bar on stderr when it is a terminal, a summary at the end, `--json` for scripts; exit status 1 when
//! anything is wrong.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use chatvault_archive::tlog::LogTrust;
use chatvault_archive::tlog::evidence::{Evidence, verify_evidence};
use chatvault_archive::tlog::note::VerifierKey;
use chatvault_archive::verify::{Problem, Sampling, VerifyReport, verify_archive};
use chatvault_config::Config;
use chatvault_core::storage::object_store_from_config;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Configuration file naming the archive (`storage`); CHATVAULT__STORAGE__* variables override it.
    #[arg(long, short = 'c', env = "CHATVAULT_CONFIG")]
    config: Option<PathBuf>,
    /// Verify a standalone data directory's archive instead.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// A verifier key (`<origin>+<key id>+<key>`) whose checkpoint signatures are accepted; repeatable.
    /// Default: `integrity.trusted_keys` (with --data-dir, standalone's own key). Without any, signatures
    /// are not checked, and the report says so.
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<String>,
    /// A checkpoint (signed note) kept from an earlier verification: the log must still contain it, which
    /// exposes a log rolled back or rewritten since; repeatable.
    #[arg(long = "checkpoint")]
    kept_checkpoints: Vec<PathBuf>,
    /// A witness store holding copies of the checkpoints (default `integrity.witness.url`): each must be in
    /// the log.
    #[arg(long)]
    witness_url: Option<String>,
    /// Fetch and hash only N committed files, chosen at random (every chain, key record and the log are
    /// still checked): for archives too large to read whole on every run.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    sample: Option<u64>,
    /// The sample's seed (default: random, printed in the summary); the same seed checks the same files.
    #[arg(long, requires = "sample")]
    seed: Option<u64>,
}

pub async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(dir) = &args.data_dir {
        crate::checkpoint::use_data_dir(&mut config, dir)?;
    }
    let store = object_store_from_config(&config.shared.storage)?;
    let trust = log_trust(&config, &args)?;
    let sampling = match args.sample {
        None => Sampling::All,
        Some(files) => Sampling::Sample {
            files,
            seed: match args.seed {
                Some(seed) => seed,
                None => random_seed()?,
            },
        },
    };
    let bar = (std::io::stderr().is_terminal() && !args.json).then(|| {
        ProgressBar::new(0).with_style(
            ProgressStyle::with_template(
                "verifying {bar:30} {pos}/{len} files, {msg} [{elapsed_precise}, {eta} left]",
            )
            .expect("a valid progress template"),
        )
    });
    let report = verify_archive(store, &trust, sampling, |progress| {
        if let Some(bar) = &bar {
            bar.set_length(progress.files_total);
            bar.set_position(progress.files_checked);
            bar.set_message(format!("{:.1} MB", progress.bytes_checked as f64 / 1e6));
        }
    })
    .await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", summary(&config.shared.storage.url, &report));
    }
    anyhow::ensure!(
        report.is_intact(),
        "the archive failed verification: {} problem(s)",
        report.problems.len()
    );
    Ok(())
}

/// What the auditor trusts: keys, kept checkpoints, the witness.
fn log_trust(config: &Config, args: &VerifyArgs) -> anyhow::Result<LogTrust> {
    let keys = if args.trusted_keys.is_empty() {
        VerifierKey::parse_all(
            "integrity.trusted_keys",
            &config.shared.integrity.trusted_keys,
        )?
    } else {
        VerifierKey::parse_all("--trusted-key", &args.trusted_keys)?
    };
    let kept_checkpoints = args
        .kept_checkpoints
        .iter()
        .map(|path| {
            std::fs::read_to_string(path)
                .with_context(|| format!("--checkpoint {}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut witness = config.shared.integrity.witness.clone();
    if let Some(url) = &args.witness_url {
        witness.url = url.clone();
    }
    let witness = match witness.url.as_str() {
        "" => None,
        _ => Some(object_store_from_config(&witness).context("--witness-url")?),
    };
    Ok(LogTrust {
        keys,
        kept_checkpoints,
        witness,
    })
}

pub(crate) fn random_seed() -> anyhow::Result<u64> {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness for the sample's seed; give --seed"))?;
    Ok(u64::from_be_bytes(bytes))
}

fn summary(url: &str, report: &VerifyReport) -> String {
    let mut out = format!("archive {url}\n");
    for (topic, manifests) in &report.manifests {
        out.push_str(&format!(
            "  topic {topic}: {manifests} manifest(s) verified\n"
        ));
    }
    out.push_str(&format!(
        "  {} file(s), {:.1} MB, checked by size and SHA-256; {} data key record(s) present\n",
        report.files_checked,
        report.bytes_checked as f64 / 1e6,
        report.key_records_checked
    ));
    if let Sampling::Sample { files, seed } = report.sampling {
        out.push_str(&format!(
            "  sampled: {} of {} committed file(s) were fetched (`--sample {files} --seed {seed}` checks the \
             same ones); the others were not read\n",
            report.files_checked, report.files_committed
        ));
    }
    let log = &report.log;
    if log.checkpoints == 0 {
        out.push_str(
            "  transparency log: no checkpoint (nothing signed vouches for the archive)\n",
        );
    } else {
        out.push_str(&format!(
            "  transparency log: {} checkpoint(s), newest covers {} manifest(s) (root {}), {}\n",
            log.checkpoints,
            log.tree_size,
            log.root,
            if log.signatures_checked {
                "signatures verified"
            } else {
                "SIGNATURES NOT CHECKED (give --trusted-key)"
            }
        ));
    }
    if log.uncovered_manifests > 0 {
        out.push_str(&format!(
            "  {} manifest(s) committed after the newest checkpoint: not yet covered by a signature\n",
            log.uncovered_manifests
        ));
    }
    if log.external_checkpoints_matched > 0 {
        out.push_str(&format!(
            "  {} kept or witnessed checkpoint(s) found in the log\n",
            log.external_checkpoints_matched
        ));
    }
    if report.erased_files > 0 {
        out.push_str(&format!(
            "  {} file(s) erased (their data keys were shredded; intact but unreadable by design)\n",
            report.erased_files
        ));
    }
    if report.files_superseded > 0 {
        out.push_str(&format!(
            "  {} file(s) superseded by rewrite commits (retention, erasure)\n",
            report.files_superseded
        ));
    }
    for path in &report.superseded_present {
        out.push_str(&format!(
            "  warning: {path} was superseded by a rewrite but is still in the bucket (run the disposition \
             again, or wait for its Object Lock to end)\n"
        ));
    }
    let (in_flight, unexplained): (Vec<_>, Vec<_>) = report
        .unreferenced
        .iter()
        .partition(|file| file.named_by_intent);
    if !in_flight.is_empty() {
        out.push_str(&format!(
            "  {} file(s) of uncommitted batches (named by upload intents; removed by the partition's next owner)\n",
            in_flight.len()
        ));
    }
    for file in unexplained {
        out.push_str(&format!(
            "  warning: {} is named by no manifest and no upload intent\n",
            file.path
        ));
    }
    for problem in &report.problems {
        out.push_str(&format!("  PROBLEM: {}\n", describe(problem)));
    }
    out.push_str(if report.is_intact() {
        "intact\n"
    } else {
        "NOT intact\n"
    });
    out
}

fn describe(problem: &Problem) -> String {
    match problem {
        Problem::BrokenChain {
            topic,
            partition,
            verified_manifests,
            detail,
        } => format!(
            "topic {topic} partition {partition}: chain verified for {verified_manifests} manifest(s), then: {detail}"
        ),
        Problem::MissingFile { path, manifest } => {
            format!("{path} is missing (committed by {manifest})")
        }
        Problem::AlteredFile {
            path,
            manifest,
            detail,
        } => format!("{path} was altered: {detail} (committed by {manifest})"),
        Problem::MissingKeyRecord { path, needed_by } => {
            format!(
                "data key record {path} is missing (needed by {needed_by} and every file of its month)"
            )
        }
        Problem::KeyMismatch {
            path,
            needed_by,
            detail,
        } => format!(
            "data key record {path} does not open {needed_by}: {detail}, and no erasure explains it"
        ),
        Problem::IncompleteErasure { path, erasure } => format!(
            "data key record {path} is still present although {erasure} records its erasure: a shred stopped \
             half-way; run `chatvault keys shred` again"
        ),
        Problem::BadLog { path, detail } => format!("transparency log {path}: {detail}"),
        Problem::LogEntry {
            index,
            topic,
            partition,
            seq,
            detail,
        } => format!(
            "transparency log leaf {index} (topic {topic} partition {partition} manifest {seq}): {detail}"
        ),
        Problem::LogRollback { detail } => format!("transparency log: {detail}"),
        Problem::BadGovernance { detail } => format!("governance stream: {detail}"),
        Problem::BadRewrite {
            topic,
            partition,
            seq,
            detail,
        } => format!("topic {topic} partition {partition} rewrite manifest {seq}: {detail}"),
        Problem::Unreadable { path, detail } => format!("{path} could not be read: {detail}"),
    }
}

/// `chatvault verify-export`: checks an exported conversation's evidence offline
/// (`chatvault_archive::tlog::evidence`), with nothing but the file and the archive's verifier key.
#[derive(Args, Debug)]
pub struct VerifyExportArgs {
    /// The evidence file (`chatvault restore --evidence FILE`).
    file: PathBuf,
    /// A verifier key (`<origin>+<key id>+<key>`) whose checkpoint signatures are accepted; repeatable.
    /// Default: `integrity.trusted_keys` of -c, or standalone's own key with --data-dir.
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<String>,
    #[arg(long, short = 'c', env = "CHATVAULT_CONFIG")]
    config: Option<PathBuf>,
    /// Trust the key of a standalone data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Also print the verified conversation as a transcript.
    #[arg(long)]
    print: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

pub async fn verify_export(args: VerifyExportArgs) -> anyhow::Result<()> {
    let keys = if args.trusted_keys.is_empty() {
        let mut config = Config::load(args.config.as_deref())?;
        if let Some(dir) = &args.data_dir {
            crate::checkpoint::use_data_dir(&mut config, dir)?;
        }
        VerifierKey::parse_all(
            "integrity.trusted_keys",
            &config.shared.integrity.trusted_keys,
        )?
    } else {
        VerifierKey::parse_all("--trusted-key", &args.trusted_keys)?
    };
    anyhow::ensure!(
        !keys.is_empty(),
        "no trusted key: give --trusted-key (the archive's verifier key), -c or --data-dir"
    );
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let evidence: Evidence = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an evidence document", args.file.display()))?;
    let report = verify_evidence(&evidence, &keys)
        .map_err(|why| anyhow::anyhow!("{} does NOT verify: {why}", args.file.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "conversation {} of tenant {}: {} event(s) from {} archive file(s), every one a row of a file \
             whose manifest is in checkpoint {} of {} (signature verified)",
            evidence.conversation_id,
            evidence.tenant_id,
            report.events,
            report.files,
            report.tree_size,
            report.origin
        );
        if report.unexported_rows > 0 {
            println!(
                "  {} row(s) of those files are not in the export (outside its time range, or copies)",
                report.unexported_rows
            );
        }
        println!("verified");
    }
    if args.print {
        let events = evidence
            .decoded_events()
            .map_err(|why| anyhow::anyhow!(why))?;
        print!(
            "{}",
            chatvault_restorer::render::render_text(&chatvault_restorer::rehydrate(&events))
        );
    }
    Ok(())
}
