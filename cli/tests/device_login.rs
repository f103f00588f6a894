//! `chatvault login`: a person signs in with the OAuth 2.0 device authorization grant (RFC 8628) at a real
//! OpenID provider (node-oidc-provider, started by the test, whose pages the test fills in as the person
//! would), the sign-in is kept privately in the configuration directory, and client commands are then
//! authorized through it by a restorer that maps the person's groups to roles, renewing it with the refresh
//! token when it is about to expire.

#![cfg(unix)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chatvault_core::auth::Role;
use chatvault_core::config::{OidcIssuerConfig, OidcRoleRule};
use chatvault_testkit::kafka::TestKafka;
use chatvault_testkit::oidc::{
    DeviceDecision, DeviceFlow, OidcProvider, SigningKey, complete_device_sign_in,
};
use chatvault_testkit::pipeline::{RunningRole, TOPIC, start_restorer, test_config};
use chatvault_testkit::s3::S3Server;
use serde_json::Value;

const AUDIENCE: &str = "urn:chatvault";
const CLIENT_ID: &str = "chatvault-cli";

/// Alice's groups map to the restore role for tenant acme; Mallory's to nothing.
fn device_flow() -> DeviceFlow {
    DeviceFlow::new(
        CLIENT_ID,
        &[
            ("alice", &["chatvault-acme-legal"]),
            ("mallory", &["some-other-app"]),
        ],
    )
}

/// A restorer that accepts `issuer`'s access tokens for [`AUDIENCE`] and lets the group
/// `chatvault-acme-legal` restore tenant acme, with the Kafka (audit topic) and S3 it needs.
struct Api {
    restorer: RunningRole,
    _kafka: TestKafka,
    _s3: S3Server,
    _keyring: tempfile::TempDir,
}

async fn start_api(issuer: &str) -> anyhow::Result<Api> {
    let kafka = TestKafka::start(TOPIC, 1)?;
    let s3 = S3Server::start("archive").await?;
    let keyring = tempfile::tempdir()?;
    let mut config = test_config(
        &kafka.brokers,
        s3.storage_config(),
        &keyring.path().join("keyring.json"),
    );
    config.shared.oidc = vec![OidcIssuerConfig {
        issuer: issuer.into(),
        audience: AUDIENCE.into(),
        allow_http: true,
        roles: vec![OidcRoleRule {
            claim: "groups".into(),
            value: "chatvault-acme-legal".into(),
            tenant: "acme".into(),
            roles: vec![Role::Restore],
        }],
        ..OidcIssuerConfig::default()
    }];
    config.validate()?;
    Ok(Api {
        restorer: start_restorer(&config).await?,
        _kafka: kafka,
        _s3: s3,
        _keyring: keyring,
    })
}

/// The `chatvault` binary as a person runs it: its configuration directory is `config_home`, no token is
/// given, and debug logs are on (they must not show a token either).
fn chatvault(config_home: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chatvault"));
    command
        .args(args)
        .env("XDG_CONFIG_HOME", config_home)
        .env("RUST_LOG", "debug")
        .env_remove("CHATVAULT_TOKEN")
        .env_remove("CHATVAULT_OIDC_ISSUER")
        .env_remove("CHATVAULT_OIDC_CLIENT_ID")
        .env_remove("CHATVAULT_OIDC_SCOPE")
        .env_remove("CHATVAULT_OIDC_RESOURCE")
        .stdin(Stdio::null());
    command
}

/// `chatvault conversations --tenant acme` against `api`, with a data directory holding no standalone token;
/// its exit status and output (stdout, stderr).
fn conversations(config_home: &Path, api: &Api) -> anyhow::Result<(ExitStatus, String, String)> {
    let no_standalone = tempfile::tempdir()?;
    let output = chatvault(
        config_home,
        &[
            "conversations",
            "--restorer",
            &api.restorer.endpoint(),
            "--tenant",
            "acme",
            "--data-dir",
            &no_standalone.path().display().to_string(),
        ],
    )
    .output()?;
    Ok((
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// Runs `chatvault login --issuer <issuer> --client-id <client_id> <extra>`; once it shows the verification
/// URI and user code, the person at the browser does `decision`. Its exit status and stderr.
async fn login(
    config_home: &Path,
    issuer: &str,
    client_id: &str,
    extra: &[&str],
    decision: DeviceDecision,
) -> anyhow::Result<(ExitStatus, String)> {
    let mut args = vec!["login", "--issuer", issuer, "--client-id", client_id];
    args.extend_from_slice(extra);
    let mut child = chatvault(config_home, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().expect("piped stderr");
    let (lines, mut received) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    let mut log = String::new();
    loop {
        // A bound for a broken command only: a sign-in takes a few seconds.
        let Ok(line) = tokio::time::timeout(Duration::from_secs(120), received.recv()).await else {
            let _ = child.kill();
            anyhow::bail!("chatvault login hung; its output so far:\n{log}");
        };
        let Some(line) = line else { break };
        log.push_str(&line);
        log.push('\n');
        // "To sign in, open <verification URI> in a browser and enter the code <user code>"
        if let Some(rest) = line.strip_prefix("To sign in, open ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let (uri, code) = (words[0], words[words.len() - 1]);
            complete_device_sign_in(uri, code, &decision).await?;
        }
    }
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    Ok((status, log))
}

fn approve(login: &str) -> DeviceDecision {
    DeviceDecision::Approve {
        login: login.into(),
    }
}

fn credentials_file(config_home: &Path) -> std::path::PathBuf {
    config_home.join("chatvault/credentials.json")
}

fn stored(config_home: &Path) -> anyhow::Result<Value> {
    Ok(serde_json::from_slice(&std::fs::read(credentials_file(
        config_home,
    ))?)?)
}

fn mode(path: &Path) -> anyhow::Result<u32> {
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
}

fn claims_of(token: &str) -> anyhow::Result<Value> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("not a JWT"))?;
    Ok(serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload)?)?)
}

fn tokens_of(stored: &Value) -> Vec<String> {
    ["access_token", "refresh_token"]
        .iter()
        .filter_map(|name| stored[name].as_str().map(str::to_string))
        .collect()
}

/// Fails when any of `tokens` appears in `output`.
fn assert_no_token_in(output: &str, tokens: &[String], what: &str) {
    for token in tokens {
        assert!(
            !output.contains(token.as_str()),
            "{what} shows a token:\n{output}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_sign_in_is_kept_privately_and_authorizes_client_commands_by_the_persons_groups()
-> anyhow::Result<()> {
    let key = SigningKey::generate("device-key")?;
    let provider = OidcProvider::start_with_device_flow(&[&key], AUDIENCE, &[], device_flow())?;
    let api = start_api(&provider.issuer()).await?;
    let home = tempfile::tempdir()?;

    let (status, log) = login(
        home.path(),
        &provider.issuer(),
        CLIENT_ID,
        &["--resource", AUDIENCE],
        approve("alice"),
    )
    .await?;
    assert!(status.success(), "chatvault login failed:\n{log}");
    let file = credentials_file(home.path());
    assert_eq!(
        mode(&file)?,
        0o600,
        "the credentials file is the owner's only"
    );
    assert_eq!(mode(file.parent().expect("directory"))?, 0o700);
    let signed_in = stored(home.path())?;
    assert_eq!(signed_in["issuer"], provider.issuer());
    assert_eq!(signed_in["client_id"], CLIENT_ID);
    assert_eq!(signed_in["resource"], AUDIENCE);
    let refresh_token = signed_in["refresh_token"].as_str().unwrap_or_default();
    assert!(
        !refresh_token.is_empty(),
        "offline_access gives a refresh token"
    );
    let now = chatvault_core::time::now_micros() / 1_000_000;
    assert!(
        signed_in["expires_at"].as_i64().unwrap_or_default() > now + 60,
        "{}",
        signed_in["expires_at"]
    );
    let claims = claims_of(signed_in["access_token"].as_str().unwrap_or_default())?;
    assert_eq!(claims["aud"], AUDIENCE, "{claims}");
    assert_eq!(claims["sub"], "alice", "{claims}");
    assert_eq!(
        claims["groups"],
        serde_json::json!(["chatvault-acme-legal"])
    );
    let tokens = tokens_of(&signed_in);
    assert_no_token_in(&log, &tokens, "chatvault login");

    // No --token and no standalone token: the restorer sees Alice through the stored sign-in, and her group
    // holds the restore role. Her token is valid for an hour, so it is used as it is.
    let (status, stdout, stderr) = conversations(home.path(), &api)?;
    assert!(status.success(), "conversations failed:\n{stderr}");
    assert!(stdout.contains("conversation"), "{stdout}");
    assert_no_token_in(&stderr, &tokens, "chatvault conversations");
    assert_eq!(stored(home.path())?, signed_in, "nothing to renew yet");

    // Mallory signs in (replacing Alice's sign-in): authenticated, but her groups grant nothing.
    let (status, log) = login(
        home.path(),
        &provider.issuer(),
        CLIENT_ID,
        &["--resource", AUDIENCE],
        approve("mallory"),
    )
    .await?;
    assert!(status.success(), "chatvault login failed:\n{log}");
    let (status, _, stderr) = conversations(home.path(), &api)?;
    assert!(!status.success());
    assert!(
        stderr.contains("mallory does not hold the restore role for tenant acme"),
        "{stderr}"
    );

    // Signed out, nothing authorizes the command any more, and it says how to sign in.
    let output = chatvault(home.path(), &["logout"]).output()?;
    assert!(output.status.success(), "{output:?}");
    assert!(!file.exists());
    let (status, _, stderr) = conversations(home.path(), &api)?;
    assert!(!status.success());
    assert!(
        stderr.contains("not signed in (`chatvault login`)"),
        "{stderr}"
    );

    api.restorer.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_sign_in_is_renewed_with_its_refresh_token_and_a_refused_renewal_asks_to_sign_in_again()
-> anyhow::Result<()> {
    let key = SigningKey::generate("device-key")?;
    // Access tokens live 30 s, less than the minute before expiry at which client commands renew them:
    // every command renews, without the test waiting for a clock.
    let provider = OidcProvider::start_with_device_flow(
        &[&key],
        AUDIENCE,
        &[],
        DeviceFlow {
            access_token_ttl: Some(Duration::from_secs(30)),
            ..device_flow()
        },
    )?;
    let api = start_api(&provider.issuer()).await?;
    let home = tempfile::tempdir()?;

    // Without --resource: the provider's default resource is chatvault's audience.
    let (status, log) = login(
        home.path(),
        &provider.issuer(),
        CLIENT_ID,
        &[],
        approve("alice"),
    )
    .await?;
    assert!(status.success(), "chatvault login failed:\n{log}");
    let first = stored(home.path())?;
    assert_eq!(
        claims_of(first["access_token"].as_str().unwrap_or_default())?["aud"],
        AUDIENCE
    );

    let mut previous = first.clone();
    for round in 1..=2 {
        let (status, _, stderr) = conversations(home.path(), &api)?;
        assert!(
            status.success(),
            "round {round}: conversations failed:\n{stderr}"
        );
        let renewed = stored(home.path())?;
        assert_ne!(
            renewed["access_token"], previous["access_token"],
            "round {round}: the access token was renewed"
        );
        // node-oidc-provider rotates the refresh tokens of public clients: the new one must be kept.
        assert_ne!(
            renewed["refresh_token"], previous["refresh_token"],
            "round {round}: the rotated refresh token was stored"
        );
        assert!(renewed["expires_at"].as_i64() >= previous["expires_at"].as_i64());
        assert_eq!(renewed["issuer"], first["issuer"]);
        assert_eq!(mode(&credentials_file(home.path()))?, 0o600);
        let claims = claims_of(renewed["access_token"].as_str().unwrap_or_default())?;
        assert_eq!(claims["sub"], "alice");
        assert_eq!(
            claims["groups"],
            serde_json::json!(["chatvault-acme-legal"])
        );
        let mut shown = tokens_of(&renewed);
        shown.extend(tokens_of(&previous));
        assert_no_token_in(&stderr, &shown, "a renewing chatvault conversations");
        previous = renewed;
    }

    // A refresh token the provider no longer honours (here: the first one, already spent): the command
    // fails and tells the person to sign in again.
    let mut spent = previous.clone();
    spent["refresh_token"] = first["refresh_token"].clone();
    std::fs::write(credentials_file(home.path()), spent.to_string())?;
    let (status, _, stderr) = conversations(home.path(), &api)?;
    assert!(!status.success());
    assert!(
        stderr.contains("could not be renewed; run `chatvault login` again"),
        "{stderr}"
    );
    assert!(
        stderr.contains("invalid_grant"),
        "the provider's reason: {stderr}"
    );

    api.restorer.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_sign_in_and_unsuitable_providers_fail_clearly_and_store_nothing()
-> anyhow::Result<()> {
    let key = SigningKey::generate("device-key")?;
    let provider = OidcProvider::start_with_device_flow(&[&key], AUDIENCE, &[], device_flow())?;
    let without_device_grant = OidcProvider::start(&[&key], AUDIENCE, &[])?;
    let home = tempfile::tempdir()?;
    let issuer = provider.issuer();
    let misspelt_issuer = format!("{issuer}/");
    let cases = [
        (
            "the person aborts at the provider",
            issuer.as_str(),
            CLIENT_ID,
            "the sign-in was declined at the provider (access_denied",
        ),
        (
            "an issuer written differently from the provider's",
            misspelt_issuer.as_str(),
            CLIENT_ID,
            "names issuer",
        ),
        (
            "a provider without the device grant",
            &without_device_grant.issuer(),
            CLIENT_ID,
            "does not support the device authorization grant",
        ),
        (
            "a client the provider does not know",
            issuer.as_str(),
            "no-such-client",
            "refused to start a device sign-in for client no-such-client: invalid_client",
        ),
    ];
    for (what, issuer, client_id, wanted) in cases {
        let (status, log) =
            login(home.path(), issuer, client_id, &[], DeviceDecision::Abort).await?;
        assert!(!status.success(), "{what}: login succeeded:\n{log}");
        assert!(log.contains(wanted), "{what}: {log}");
        assert!(
            !credentials_file(home.path()).exists(),
            "{what}: something was stored"
        );
    }
    Ok(())
}
