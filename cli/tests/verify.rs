//! `chatvault verify` checks an archive from the bucket alone (here a `file://` archive written the way the
//! archiver writes it) and reports precisely what was altered: a file's bytes, a missing file, a removed
//! manifest, a missing data key record, and files no manifest names.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use chatvault_archive::keys::DataKeys;
use chatvault_restorer::testing::Fixture;
use object_store::ObjectStore;
use serde_json::Value;

fn verify(archive: &Path, json: bool) -> anyhow::Result<(bool, String)> {
    verify_with(archive, json, &[])
}

fn verify_with(archive: &Path, json: bool, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chatvault"));
    command
        .arg("verify")
        .args(args)
        .env(
            "CHATVAULT__STORAGE__URL",
            format!("file://{}", archive.display()),
        )
        .env_remove("CHATVAULT_CONFIG");
    if json {
        command.arg("--json");
    }
    let output = command.output()?;
    Ok((
        output.status.success(),
        String::from_utf8(output.stdout)? + &String::from_utf8_lossy(&output.stderr),
    ))
}

fn problems(report: &Value) -> Vec<(String, String)> {
    report["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|problem| {
            let what = problem["path"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("partition {}", problem["partition"]));
            (problem["kind"].as_str().expect("kind").to_string(), what)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_every_alteration_of_the_archive_and_names_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let archive = dir.path().join("archive");
    std::fs::create_dir_all(&archive)?;
    let store: Arc<dyn ObjectStore> = Arc::new(
        object_store::local::LocalFileSystem::new_with_prefix(&archive)?,
    );
    let keys = DataKeys::with_local_keyring(store.clone(), &dir.path().join("keyring.json"))?;
    let fixture = Fixture::over(store, keys, "chatvault.events");
    let batch = |tenant: &str, first: u64| -> Vec<chatvault_proto::v1::ChatEvent> {
        (first..first + 3)
            .map(|i| common::message_event(tenant, &format!("m{i}"), "text"))
            .collect()
    };
    // Partition 0: three batches of two tenants' files; partition 1: one.
    let mut committed = Vec::new();
    for seq in 0..3 {
        let mut events = batch("acme", seq * 10);
        events.extend(batch("globex", seq * 10));
        committed.push(fixture.commit_batch(0, &events).await.0);
    }
    fixture.commit_batch(1, &batch("acme", 100)).await;

    let (ok, output) = verify(&archive, true)?;
    assert!(ok, "{output}");
    let report: Value = serde_json::from_str(&output[..output.rfind('}').expect("json") + 1])?;
    assert_eq!(report["manifests"]["chatvault.events"], 4);
    assert_eq!(report["files_checked"], 7);
    assert_eq!(report["key_records_checked"], 2);
    assert_eq!(problems(&report), []);

    // A sample: 3 of the 7 files, the same ones for the same seed; every chain and key record still checked.
    let sampled = |seed: &str| -> anyhow::Result<Value> {
        let (ok, output) = verify_with(&archive, true, &["--sample", "3", "--seed", seed])?;
        assert!(ok, "{output}");
        Ok(serde_json::from_str(
            &output[..output.rfind('}').expect("json") + 1],
        )?)
    };
    let report = sampled("42")?;
    assert_eq!(report["files_checked"], 3);
    assert_eq!(report["files_committed"], 7);
    assert_eq!(
        report["sampling"],
        serde_json::json!({"mode": "sample", "files": 3, "seed": 42})
    );
    assert_eq!(report["key_records_checked"], 2);
    assert_eq!(report["bytes_checked"], sampled("42")?["bytes_checked"]);
    let (ok, text) = verify_with(&archive, false, &["--sample", "3", "--seed", "42"])?;
    assert!(ok, "{text}");
    assert!(
        text.contains("sampled: 3 of 7 committed file(s) were fetched (`--sample 3 --seed 42`"),
        "{text}"
    );
    let (ok, text) = verify_with(&archive, false, &["--sample", "0"])?;
    assert!(!ok && text.contains("--sample"), "{text}");

    // Alterations, each of a different kind.
    let altered = &committed[0].files[0].path;
    let mut bytes = std::fs::read(archive.join(altered))?;
    bytes[100] ^= 1;
    std::fs::write(archive.join(altered), bytes)?;
    let removed = &committed[2].files[1].path;
    std::fs::remove_file(archive.join(removed))?;
    let stray = "events/tenant=acme/date=2025-11-24/p00000-o00000000000000000099-ffff-000.parquet";
    std::fs::write(archive.join(stray), b"not ours")?;
    std::fs::remove_file(archive.join("keys/tenant=globex/period=2025-11.json"))?;
    let (ok, output) = verify(&archive, true)?;
    assert!(!ok, "{output}");
    let report: Value = serde_json::from_str(&output[..output.rfind('}').expect("json") + 1])?;
    let mut found = problems(&report);
    found.sort();
    assert_eq!(
        found,
        [
            ("altered_file".to_string(), altered.clone()),
            ("missing_file".to_string(), removed.clone()),
            (
                "missing_key_record".to_string(),
                "keys/tenant=globex/period=2025-11.json".to_string()
            ),
        ]
    );
    assert_eq!(
        report["unreferenced"],
        serde_json::json!([{"path": stray, "named_by_intent": false}])
    );
    // Samples find what they fetch: over a few seeds, one that holds the altered file names it.
    let mut seen_altered = false;
    for seed in 0..20 {
        let seed = seed.to_string();
        let (_, output) = verify_with(&archive, true, &["--sample", "2", "--seed", &seed])?;
        let sampled: Value = serde_json::from_str(&output[..output.rfind('}').expect("json") + 1])?;
        assert_eq!(sampled["files_checked"], 2, "{output}");
        seen_altered |= problems(&sampled).contains(&("altered_file".to_string(), altered.clone()));
    }
    assert!(
        seen_altered,
        "no sample of 2 in 20 seeds held the altered file"
    );

    // A manifest removed from the middle of a chain: the chain is verified up to it, and no further.
    std::fs::remove_file(
        archive.join("manifests/topic=chatvault.events/partition=0/00000000000000000001.json"),
    )?;
    let (ok, text) = verify(&archive, false)?;
    assert!(!ok);
    assert!(
        text.contains(
            "topic chatvault.events partition 0: chain verified for 1 manifest(s), then:"
        ) && text.contains("manifests 1 to 1 are missing"),
        "{text}"
    );
    assert!(
        text.contains("NOT intact") && text.contains("failed verification"),
        "{text}"
    );
    Ok(())
}
