//! `chatvault checkpoint`: the transparency log's keys and checkpoints.
//! - `keygen` writes a checkpoint signing key (mode 0600) and prints the verifier key auditors get;
//! - `sign` runs one checkpoint round now (archivers do it every `integrity.checkpoint_interval`).
//!
//! Standalone keeps its key in the data directory ([`standalone_signing_key`]), and `chatvault verify
//! --data-dir` trusts it.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use chatvault_archive::keys::pkcs11::Pkcs11Hsm;
use chatvault_archive::tlog::Round;
use chatvault_archive::tlog::note::{NoteSigner, SigningKey};
use chatvault_archiver::checkpoint::{checkpoint_round, committer_from_config};
use chatvault_config::Config;
use chatvault_core::storage::object_store_from_config;
use clap::{Args, Subcommand};

use crate::credentials::create_private_file;

/// The signing key standalone creates in its data directory.
pub const STANDALONE_SIGNING_KEY: &str = "checkpoint-signing-key";
/// Its verifier key, beside it, for `chatvault verify --data-dir`.
pub const STANDALONE_VERIFIER_KEY: &str = "checkpoint-verifier-key";
/// Standalone's log origin.
const STANDALONE_ORIGIN: &str = "chatvault-standalone";

#[derive(Args, Debug)]
pub struct CheckpointArgs {
    #[command(subcommand)]
    command: CheckpointCommand,
}

#[derive(Subcommand, Debug)]
enum CheckpointCommand {
    /// Create a checkpoint signing key: written to --out (mode 0600, never overwritten), or generated on the
    /// PKCS#11 token of `keys.pkcs11` with --pkcs11-label (it never leaves the HSM); the verifier key for
    /// `integrity.trusted_keys` and auditors is printed.
    Keygen {
        /// The log's origin, which names the key: unique per archive, no spaces or '+', for example
        /// `chatvault.example.com/archive-eu`.
        #[arg(long)]
        origin: String,
        /// Where to write the signing key (a secret).
        #[arg(
            long,
            required_unless_present = "pkcs11_label",
            conflicts_with = "pkcs11_label"
        )]
        out: Option<PathBuf>,
        /// Generate the key on the HSM under this label instead (then set integrity.signing_key_pkcs11_label
        /// and integrity.origin).
        #[arg(long, requires = "config")]
        pkcs11_label: Option<String>,
        /// Configuration naming the HSM (`keys.pkcs11`), with --pkcs11-label.
        #[arg(long, short = 'c', env = "CHATVAULT_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Sign a checkpoint over everything committed since the last one, now.
    Sign {
        /// Configuration file (`storage`, `integrity.signing_key_path`).
        #[arg(long, short = 'c', env = "CHATVAULT_CONFIG")]
        config: Option<PathBuf>,
        /// A standalone data directory's archive and key instead.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

pub async fn checkpoint(args: CheckpointArgs) -> anyhow::Result<()> {
    match args.command {
        CheckpointCommand::Keygen {
            origin,
            out: None,
            pkcs11_label: Some(label),
            config,
        } => {
            let config = Config::load(config.as_deref())?;
            let hsm = Pkcs11Hsm::open(&config.shared.keys.pkcs11)?;
            let key = hsm.generate_note_key(&label, &origin)?;
            println!("{}", key.verifier_key());
            eprintln!(
                "signing key {label:?} generated on token {:?}; set integrity.signing_key_pkcs11_label = \
                 {label:?} and integrity.origin = {origin:?}; the line above is the verifier key for \
                 integrity.trusted_keys and for auditors (chatvault verify --trusted-key)",
                config.shared.keys.pkcs11.token_label
            );
            Ok(())
        }
        CheckpointCommand::Keygen { out: None, .. } => {
            anyhow::bail!("give --out FILE or --pkcs11-label LABEL")
        }
        CheckpointCommand::Keygen {
            origin,
            out: Some(out),
            ..
        } => {
            let (key, text) = SigningKey::generate(&origin)?;
            let mut file = create_private_file(&out)
                .with_context(|| format!("creating {} (it must not exist yet)", out.display()))?;
            file.write_all(format!("{text}\n").as_bytes())?;
            println!("{}", key.verifier_key());
            eprintln!(
                "signing key written to {} (keep it secret); the line above is the verifier key for \
                 integrity.trusted_keys and for auditors (chatvault verify --trusted-key)",
                out.display()
            );
            Ok(())
        }
        CheckpointCommand::Sign { config, data_dir } => {
            let mut config = Config::load(config.as_deref())?;
            if let Some(dir) = &data_dir {
                use_data_dir(&mut config, dir)?;
            }
            let store = object_store_from_config(&config.shared.storage)?;
            let committer = committer_from_config(
                &config.shared,
                store,
                &format!("operator:{}", chatvault_core::instance_name()),
            )?
            .context(
                "neither integrity.signing_key_path nor integrity.signing_key_pkcs11_label is set: there is \
                 no key to sign with",
            )?;
            match checkpoint_round(&committer).await? {
                Round::Signed {
                    tree_size,
                    appended,
                    checkpoint,
                } => {
                    eprintln!("signed a checkpoint of {tree_size} leaves ({appended} new):");
                    print!("{checkpoint}");
                }
                Round::UpToDate { tree_size } => {
                    eprintln!("nothing new to log; the newest checkpoint covers {tree_size} leaves")
                }
                Round::Lost => eprintln!("another committer signed this checkpoint first"),
            }
            Ok(())
        }
    }
}

/// Points `config` at a standalone data directory: its archive and, when the directory has one, its
/// checkpoint keys.
pub fn use_data_dir(config: &mut Config, dir: &Path) -> anyhow::Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("--data-dir {}", dir.display()))?;
    config.shared.storage.url = data_dir_archive_url(&dir);
    let signing_key = dir.join(STANDALONE_SIGNING_KEY);
    if signing_key.exists() {
        config.shared.integrity.signing_key_path = Some(signing_key);
    }
    if let Ok(verifier) = std::fs::read_to_string(dir.join(STANDALONE_VERIFIER_KEY)) {
        config.shared.integrity.trusted_keys = vec![verifier.trim().to_string()];
    }
    Ok(())
}

/// The archive of a standalone data directory (`dir` canonical), as `storage.url`.
fn data_dir_archive_url(dir: &Path) -> String {
    format!("file://{}", dir.join("archive").display())
}

/// Standalone's signing key in `data_dir`, created (with its verifier key beside it) on first start.
pub fn standalone_signing_key(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let path = data_dir.join(STANDALONE_SIGNING_KEY);
    if !path.exists() {
        let (key, text) = SigningKey::generate(STANDALONE_ORIGIN)?;
        create_private_file(&path)
            .and_then(|mut file| file.write_all(format!("{text}\n").as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        std::fs::write(
            data_dir.join(STANDALONE_VERIFIER_KEY),
            format!("{}\n", key.verifier_key()),
        )?;
    }
    Ok(path)
}
