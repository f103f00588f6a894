//! A PKCS#11 token for tests: SoftHSM2 (Debian `softhsm2`, installed by `scripts/setup-test-deps.sh`) with its
//! token directory in a temporary directory, initialized with `softhsm2-util`. Processes find it through the
//! `SOFTHSM2_CONF` variable ([`SoftHsm::env`]), given to child processes only.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;
use chatvault_core::config::Pkcs11Config;

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const PIN: &str = "20261204";
const SO_PIN: &str = "security-officer";

pub struct SoftHsm {
    _dir: tempfile::TempDir,
    /// The configuration file's path, as `SOFTHSM2_CONF` names it.
    conf: String,
    pub token_label: String,
}

impl SoftHsm {
    /// A fresh token labelled `token_label` with the user PIN [`PIN`].
    pub fn start(token_label: &str) -> anyhow::Result<SoftHsm> {
        anyhow::ensure!(
            std::path::Path::new(MODULE).exists(),
            "{MODULE} is missing: run scripts/setup-test-deps.sh (scripts/test.sh does) to install softhsm2"
        );
        let dir = tempfile::tempdir()?;
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&tokens)?;
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )?;
        let output = Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                token_label,
                "--pin",
                PIN,
                "--so-pin",
                SO_PIN,
            ])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .context("running softhsm2-util (install softhsm2: scripts/setup-test-deps.sh)")?;
        anyhow::ensure!(
            output.status.success(),
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(SoftHsm {
            _dir: dir,
            conf: conf.display().to_string(),
            token_label: token_label.to_string(),
        })
    }

    /// The environment a process needs to find this token.
    pub fn env(&self) -> [(&str, &str); 1] {
        [("SOFTHSM2_CONF", self.conf.as_str())]
    }

    /// `keys.pkcs11` for this token.
    pub fn config(&self) -> Pkcs11Config {
        Pkcs11Config {
            module: PathBuf::from(MODULE),
            token_label: self.token_label.clone(),
            pin: Some(PIN.into()),
            ..Pkcs11Config::default()
        }
    }
}
