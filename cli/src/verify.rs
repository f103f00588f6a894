//! `chatvault verify`: checks a whole archive from the bucket alone (no keys, no Kafka, no service), as an
//! auditor with read access would: every manifest chain, every committed file by size and SHA-256, every data
//! key record a file needs, and what no manifest names (`chatvault_archive::verify`). Progress on stderr when
//! it is a terminal, a summary at the end, `--json` for scripts; exit status 1 when anything is wrong.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use chatvault_archive::verify::{Problem, VerifyReport, verify_archive};
use chatvault_config::Config;
use chatvault_core::storage::object_store_from_config;
use clap::Args;

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
}

pub async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(dir) = &args.data_dir {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("--data-dir {}", dir.display()))?;
        config.shared.storage.url = format!("file://{}", dir.join("archive").display());
    }
    let store = object_store_from_config(&config.shared.storage)?;
    let show_progress = std::io::stderr().is_terminal() && !args.json;
    let report = verify_archive(store, |progress| {
        if show_progress
            && (progress.files_checked % 50 == 0 || progress.files_checked == progress.files_total)
        {
            eprint!(
                "\rverifying: {}/{} files, {:.1} MB",
                progress.files_checked,
                progress.files_total,
                progress.bytes_checked as f64 / 1e6
            );
        }
    })
    .await?;
    if show_progress {
        eprintln!();
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
    if report.erased_files > 0 {
        out.push_str(&format!(
            "  {} file(s) erased (their data keys were shredded; intact but unreadable by design)\n",
            report.erased_files
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
        Problem::Unreadable { path, detail } => format!("{path} could not be read: {detail}"),
    }
}
