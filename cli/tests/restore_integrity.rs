//! The restorer checks what it serves against the transparency log: `chatvault standalone --demo` signs
//! checkpoints with its own key and trusts it, so a restore starts with an `integrity` item saying the
//! conversation is covered; once an attacker rewrites a covered manifest (re-linking the chain after it so
//! every link still verifies), the restorer refuses the tenant's data and `chatvault verify` fails. A
//! conversation's evidence (`restore --evidence`) verifies offline (`verify-export`); a modified message, an
//! altered manifest or another key's checkpoint does not. A restore drill passes over the healthy archive,
//! fails over a corrupted file naming the conversation and the file, and both signed reports are listed.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chatvault_archive::tlog::evidence::Evidence;
use chatvault_archive::tlog::note::{NoteSigner, SigningKey};
use chatvault_testkit::process::{ChildRole, free_address, wait_until_serving};

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_chatvault"))
}

/// Standalone on `data_dir`; returns it and the restorer's endpoint.
async fn start_standalone(data_dir: &Path, demo: bool) -> anyhow::Result<(ChildRole, String)> {
    let restorer = free_address()?;
    let data_dir_arg = data_dir.to_string_lossy().to_string();
    let (gateway, http, metrics) = (free_address()?, free_address()?, free_address()?);
    let mut args = vec![
        "standalone",
        "--data-dir",
        &data_dir_arg,
        "--partitions",
        "2",
        "--gateway-listen",
        &gateway,
        "--restorer-listen",
        &restorer,
        "--http-listen",
        &http,
        "--metrics-listen",
        &metrics,
    ];
    if demo {
        args.push("--demo");
    }
    let process = ChildRole::spawn("standalone", binary(), &args)?;
    let endpoint = format!("http://{restorer}");
    wait_until_serving(
        &endpoint,
        "chatvault.v1.RestoreService",
        Duration::from_secs(60),
    )
    .await?;
    Ok((process, endpoint))
}

/// `chatvault restore --json` of the demo conversation: success and stdout, or failure and stderr.
fn restore(data_dir: &Path, endpoint: &str) -> anyhow::Result<(bool, String)> {
    let output = Command::new(binary())
        .args(["restore", "--data-dir"])
        .arg(data_dir)
        .args([
            "--restorer",
            endpoint,
            "--tenant",
            "demo",
            "--conversation",
            "demo-general",
            "--json",
        ])
        .output()?;
    let text = if output.status.success() {
        String::from_utf8(output.stdout)?
    } else {
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    Ok((output.status.success(), text))
}

/// Clears the files of manifest 0 of every partition of the events topic and re-links the rest of each
/// chain to it: every link verifies, but the manifests are not the ones the checkpoints logged.
fn rewrite_chains(archive: &Path) -> anyhow::Result<usize> {
    let mut rewritten = 0;
    let topic = archive.join("manifests/topic=chatvault.events");
    for partition in std::fs::read_dir(topic)? {
        let mut manifests: Vec<_> = std::fs::read_dir(partition?.path())?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        manifests.sort();
        let mut prev: Option<String> = None;
        for path in manifests {
            let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
            match &prev {
                None => manifest["files"] = serde_json::json!([]),
                Some(sha) => manifest["prev_sha256"] = serde_json::json!(sha),
            }
            let bytes = serde_json::to_vec_pretty(&manifest)?;
            prev = Some(hex::encode(ring::digest::digest(
                &ring::digest::SHA256,
                &bytes,
            )));
            std::fs::write(&path, bytes)?;
            rewritten += 1;
        }
    }
    Ok(rewritten)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_report_coverage_and_refuse_what_a_checkpoint_contradicts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let (mut standalone, endpoint) = start_standalone(&data_dir, true).await?;

    // The demo's conversation is archived within seconds and covered by the next checkpoint (every 5 s).
    let deadline = Instant::now() + Duration::from_secs(120);
    let integrity = loop {
        let (ok, text) = restore(&data_dir, &endpoint)?;
        let first: Option<serde_json::Value> = ok
            .then(|| {
                text.lines()
                    .next()
                    .and_then(|line| serde_json::from_str(line).ok())
            })
            .flatten();
        if let Some(first) = first
            && first["type"] == "integrity"
            && first["coverage"] == "COVERED"
            && text.lines().count() > 1
        {
            break first;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the demo conversation was never restored fully covered; last answer: {text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(integrity["uncovered_files"], 0, "{integrity}");
    assert!(
        integrity["files"].as_u64().unwrap_or_default() >= 1,
        "{integrity}"
    );
    let checkpoint = integrity["checkpoint"].as_str().unwrap_or_default();
    // A C2SP signed note: standalone's origin, the tree size and root, a blank line, the signature line.
    assert!(
        checkpoint.starts_with("chatvault-standalone\n")
            && checkpoint.contains("\n\n\u{2014} chatvault-standalone "),
        "not a signed checkpoint: {checkpoint}"
    );

    // Evidence: written by the restorer, verified offline with nothing but the file and the verifier key.
    let evidence_file = dir.path().join("evidence.json");
    let output = Command::new(binary())
        .args(["restore", "--data-dir"])
        .arg(&data_dir)
        .args([
            "--restorer",
            &endpoint,
            "--tenant",
            "demo",
            "--conversation",
            "demo-general",
        ])
        .arg("--evidence")
        .arg(&evidence_file)
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let verifier = std::fs::read_to_string(data_dir.join("checkpoint-verifier-key"))?;
    let verify_export = |file: &Path, key: &str| -> anyhow::Result<(bool, String)> {
        let output = Command::new(binary())
            .arg("verify-export")
            .arg(file)
            .args(["--trusted-key", key.trim(), "--print"])
            .output()?;
        Ok((
            output.status.success(),
            String::from_utf8(output.stdout)? + &String::from_utf8_lossy(&output.stderr),
        ))
    };
    let (ok, text) = verify_export(&evidence_file, &verifier)?;
    assert!(
        ok && text.contains("verified") && text.contains("signature verified"),
        "{text}"
    );
    let evidence: Evidence = serde_json::from_str(&std::fs::read_to_string(&evidence_file)?)?;
    let mut events = evidence.decoded_events().map_err(anyhow::Error::msg)?;
    assert!(
        events.len() >= 3,
        "the demo conversation has several events"
    );
    // --print shows the verified conversation as people saw it (the demo's messages).
    assert!(text.contains("alice (U-ALICE): "), "{text}");

    // A modified message fails, naming the event.
    let modified = events
        .iter_mut()
        .find(|event| !event.text.is_empty())
        .expect("a message");
    modified.text.push_str(" (edited by the recipient)");
    let event_id = modified.event_id.clone();
    let mut altered = evidence.clone();
    altered.events = events.iter().map(Evidence::encode_event).collect();
    let altered_file = dir.path().join("altered.json");
    std::fs::write(&altered_file, serde_json::to_string(&altered)?)?;
    let (ok, text) = verify_export(&altered_file, &verifier)?;
    assert!(!ok, "a modified message verified: {text}");
    assert!(
        text.contains("does NOT verify") && text.contains(&event_id) && text.contains("altered"),
        "{text}"
    );
    // So does an altered manifest, and a checkpoint checked with another key.
    let mut altered = evidence.clone();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&BASE64.decode(&altered.files[0].manifest)?)?;
    manifest["writer_id"] = serde_json::json!("someone else");
    altered.files[0].manifest = BASE64.encode(serde_json::to_vec(&manifest)?);
    std::fs::write(&altered_file, serde_json::to_string(&altered)?)?;
    let (ok, text) = verify_export(&altered_file, &verifier)?;
    assert!(!ok && text.contains("is not leaf"), "{text}");
    let (other, _) = SigningKey::generate("chatvault-standalone")?;
    let (ok, text) = verify_export(&evidence_file, &other.verifier_key())?;
    assert!(!ok && text.contains("the checkpoint"), "{text}");

    // A restore drill against the healthy archive passes; its signed report is in the archive's history.
    let drill = |extra: &[&str]| -> anyhow::Result<(bool, String)> {
        let output = Command::new(binary())
            .args(["drill", "--data-dir"])
            .arg(&data_dir)
            .args(["--restorer", &endpoint])
            .args(extra)
            .output()?;
        Ok((
            output.status.success(),
            String::from_utf8(output.stdout)? + &String::from_utf8_lossy(&output.stderr),
        ))
    };
    let (ok, text) = drill(&["--json"])?;
    assert!(ok, "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&text[..text.rfind('}').expect("json") + 1])?;
    assert_eq!(report["passed"], true, "{report}");
    let drilled = &report["conversations"][0];
    assert_eq!(drilled["conversation_id"], "demo-general", "{report}");
    assert!(drilled["restored_events"].as_u64() >= Some(3), "{report}");
    assert_eq!(
        drilled["restored_events"], drilled["archived_events"],
        "{report}"
    );
    let (ok, text) = drill(&["--history"])?;
    assert!(
        ok && text.contains(" passed 1 conversation(s), 0 failed")
            && text.contains("signature verified"),
        "{text}"
    );

    // A corrupted file: the drill fails and names the conversation and the file.
    let file = drilled["files"][0].as_str().expect("a file").to_string();
    let path = data_dir.join("archive").join(&file);
    let mut bytes = std::fs::read(&path)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&path, bytes)?;
    let (ok, text) = drill(&[])?;
    assert!(!ok, "a drill passed over a corrupted file: {text}");
    assert!(
        text.contains("FAIL demo/demo-general") && text.contains(&file) && text.contains("FAILED"),
        "{text}"
    );
    let (ok, text) = drill(&["--history"])?;
    assert!(
        ok && text
            .lines()
            .filter(|line| line.contains("signature verified"))
            .count()
            == 2,
        "{text}"
    );
    assert!(
        text.contains(" FAILED 1 conversation(s), 1 failed"),
        "{text}"
    );

    let (status, _) = standalone
        .terminate_and_wait(Duration::from_secs(60))
        .await?;
    assert!(status.success(), "standalone exited with {status}");
    // verify names the corrupted file; the drill reports themselves are committed and logged.
    let verified = Command::new(binary())
        .args(["verify", "--data-dir"])
        .arg(&data_dir)
        .output()?;
    let text = String::from_utf8_lossy(&verified.stdout);
    assert!(
        !verified.status.success()
            && text.contains("signatures verified")
            && text.contains(&format!("{file} was altered"))
            && text.contains("topic _drill: 2 manifest(s) verified"),
        "{text}"
    );

    // An attacker rewrites the covered manifests consistently: the chains still verify link by link.
    assert!(rewrite_chains(&data_dir.join("archive"))? >= 1);
    let (mut standalone, endpoint) = start_standalone(&data_dir, false).await?;
    let (ok, text) = restore(&data_dir, &endpoint)?;
    assert!(!ok, "a contradicted archive was served: {text}");
    assert!(
        text.contains("transparency log") && text.contains("cannot be restored"),
        "{text}"
    );
    standalone
        .terminate_and_wait(Duration::from_secs(60))
        .await?;
    let verified = Command::new(binary())
        .args(["verify", "--data-dir"])
        .arg(&data_dir)
        .output()?;
    assert!(
        !verified.status.success(),
        "verify passed a rewritten archive: {}",
        String::from_utf8_lossy(&verified.stdout)
    );
    Ok(())
}
