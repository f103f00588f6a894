//! The sign-in that `chatvault login` keeps for client commands: one JSON file,
//! `$XDG_CONFIG_HOME/chatvault/credentials.json` (or `$HOME/.config/chatvault/credentials.json`), readable by
//! its owner only (on Unix the directory 0700, the file 0600) and replaced atomically, so a crash or a concurrent
//! reader never sees half a file. Tokens are [`Secret`]s: they are written to that file and sent to servers,
//! and nothing else shows them (`Debug` redacts them; there is no `Display`).
//!
//! Renewals take `credentials.lock` (an exclusive `flock` next to the file): providers rotate refresh tokens
//! and treat a second use of a spent one as theft (RFC 9700 section 4.14.2, node-oidc-provider revokes the
//! whole grant), so two commands must not renew with the same refresh token.

use std::ffi::OsString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// A token or other credential: serialized as the plain string, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place it goes: a request to the provider or an `authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// What one sign-in holds: where it was made and the tokens it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The provider's issuer identifier.
    pub issuer: String,
    /// The public client the sign-in went through.
    pub client_id: String,
    /// The API the tokens are for (RFC 8707 resource indicator), when one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// The scopes asked for.
    pub scope: String,
    /// The provider's token endpoint (from discovery at sign-in), where the refresh token is redeemed.
    pub token_endpoint: String,
    pub access_token: Secret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    /// When the access token expires, in seconds since the Unix epoch; absent when the provider did not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// The credentials file and its lock.
#[derive(Debug, Clone)]
pub struct CredentialStore {
    path: PathBuf,
}

impl CredentialStore {
    /// The store of the current user, located through `XDG_CONFIG_HOME` or `HOME`.
    pub fn of_current_user() -> anyhow::Result<CredentialStore> {
        CredentialStore::located_by(|name| std::env::var_os(name))
    }

    /// The store located through the variables `env` returns (the XDG Base Directory rules: a relative or
    /// empty `XDG_CONFIG_HOME` is ignored).
    pub fn located_by(env: impl Fn(&str) -> Option<OsString>) -> anyhow::Result<CredentialStore> {
        let set = |name: &str| {
            env(name)
                .filter(|value| !value.is_empty())
                .map(PathBuf::from)
        };
        let config_home = match set("XDG_CONFIG_HOME").filter(|path| path.is_absolute()) {
            Some(path) => path,
            None => set("HOME")
                .context("neither XDG_CONFIG_HOME nor HOME is set: no place for the sign-in")?
                .join(".config"),
        };
        Ok(CredentialStore {
            path: config_home.join("chatvault").join("credentials.json"),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn directory(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// The stored sign-in, or `None` when there is none.
    pub fn load(&self) -> anyhow::Result<Option<Credentials>> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(error).with_context(|| format!("reading {}", self.path.display()));
            }
        };
        // Only where the file is wrong, not serde's message: that can quote the value it choked on.
        serde_json::from_slice(&text).map(Some).map_err(|error| {
            anyhow::anyhow!(
                "{} is not a chatvault sign-in (at line {}, column {}); run `chatvault login` again (or `chatvault logout` to remove it)",
                self.path.display(),
                error.line(),
                error.column()
            )
        })
    }

    /// Replaces the stored sign-in: written to a temporary file (0600) in the same directory, flushed to
    /// disk, then renamed over the old one.
    pub fn save(&self, credentials: &Credentials) -> anyhow::Result<()> {
        let directory = self.private_directory()?;
        let temporary = directory.join(format!(".credentials.json.{}.tmp", std::process::id()));
        let written = (|| -> anyhow::Result<()> {
            match std::fs::remove_file(&temporary) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(error.into());
                }
                _ => {}
            }
            let mut file = create_private_file(&temporary)?;
            file.write_all(&serde_json::to_vec_pretty(credentials)?)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &self.path)?;
            // The rename itself is made durable by flushing the directory.
            #[cfg(unix)]
            File::open(directory)?.sync_all()?;
            Ok(())
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        written.with_context(|| format!("writing {}", self.path.display()))
    }

    /// Removes the stored sign-in; whether there was one.
    pub fn remove(&self) -> anyhow::Result<bool> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(error).with_context(|| format!("removing {}", self.path.display())),
        }
    }

    /// Waits for the exclusive lock on renewals; it is held until the returned file is dropped.
    pub async fn lock(&self) -> anyhow::Result<File> {
        let directory = self.private_directory()?;
        let path = directory.join("credentials.lock");
        tokio::task::spawn_blocking(move || {
            let mut options = OpenOptions::new();
            options.write(true).create(true).truncate(false);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let file = options.open(&path)?;
            file.lock()?;
            Ok::<_, std::io::Error>(file)
        })
        .await?
        .with_context(|| format!("locking {}", self.path.display()))
    }

    /// The credentials' directory, created if needed, with mode 0700 (its parents keep the defaults).
    fn private_directory(&self) -> anyhow::Result<&Path> {
        let directory = self.directory();
        (|| -> std::io::Result<()> {
            if let Some(parent) = directory.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut builder = DirBuilder::new();
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            match builder.create(directory) {
                Err(error) if error.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(error);
                }
                _ => {}
            }
            // An existing directory is narrowed too: the sign-in must not sit in a directory others can
            // list or write to.
            #[cfg(unix)]
            std::fs::set_permissions(
                directory,
                std::os::unix::fs::PermissionsExt::from_mode(0o700),
            )?;
            Ok(())
        })()
        .with_context(|| format!("creating {}", directory.display()))?;
        Ok(directory)
    }
}

/// Creates `path` as a new file only its owner can read and write (0600 on Unix, whatever the umask).
pub(crate) fn create_private_file(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path)?;
    // The mode above is narrowed by the umask only; set it exactly.
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Credentials {
        Credentials {
            issuer: "https://idp.example".into(),
            client_id: "chatvault-cli".into(),
            resource: Some("urn:chatvault".into()),
            scope: "openid offline_access".into(),
            token_endpoint: "https://idp.example/token".into(),
            access_token: Secret::new("access-token-value"),
            refresh_token: Some(Secret::new("refresh-token-value")),
            expires_at: Some(1_800_000_000),
        }
    }

    #[test]
    fn debug_output_never_shows_a_token() {
        let shown = format!("{:?} {:#?}", sample(), sample());
        assert!(!shown.contains("access-token-value"), "{shown}");
        assert!(!shown.contains("refresh-token-value"), "{shown}");
        assert!(shown.contains("https://idp.example"), "{shown}");
    }

    #[test]
    fn the_file_is_found_through_xdg_config_home_then_home() {
        let located = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect();
            CredentialStore::located_by(|name| {
                vars.iter()
                    .find(|(key, _)| key == name)
                    .map(|(_, value)| OsString::from(value))
            })
            .map(|store| store.path().to_path_buf())
        };
        assert_eq!(
            located(&[("XDG_CONFIG_HOME", "/xdg"), ("HOME", "/home/u")]).unwrap(),
            Path::new("/xdg/chatvault/credentials.json")
        );
        for ignored in ["", "relative/dir"] {
            assert_eq!(
                located(&[("XDG_CONFIG_HOME", ignored), ("HOME", "/home/u")]).unwrap(),
                Path::new("/home/u/.config/chatvault/credentials.json"),
                "XDG_CONFIG_HOME={ignored:?}"
            );
        }
        assert!(located(&[]).is_err());
    }

    #[test]
    fn saved_credentials_are_private_replaced_whole_and_read_back() {
        let home = tempfile::tempdir().unwrap();
        let store = CredentialStore {
            path: home.path().join("config/chatvault/credentials.json"),
        };
        assert_eq!(store.load().unwrap(), None);
        store.save(&sample()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(store.path()), 0o600);
            assert_eq!(mode(store.directory()), 0o700);
        }
        assert_eq!(store.load().unwrap(), Some(sample()));

        let renewed = Credentials {
            access_token: Secret::new("renewed"),
            refresh_token: None,
            expires_at: None,
            ..sample()
        };
        store.save(&renewed).unwrap();
        assert_eq!(store.load().unwrap(), Some(renewed));
        let names: Vec<_> = std::fs::read_dir(store.directory())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["credentials.json"], "no temporary file is left");

        std::fs::write(
            store.path(),
            "{\"issuer\": \"x\", \"expires_at\": \"secret-value\"}",
        )
        .unwrap();
        let error = format!("{:#}", store.load().unwrap_err());
        assert!(error.contains("run `chatvault login` again"), "{error}");
        assert!(!error.contains("secret-value"), "{error}");
        assert!(store.remove().unwrap());
        assert!(!store.remove().unwrap());
    }
}
