//! The Python interpreter of the test virtualenv (`.venv`, created by `scripts/setup-test-deps.sh`, which the
//! README's test command runs first).

use std::path::PathBuf;

/// `<workspace>/.venv/bin/python`. Panics with the fix when it is missing: the standard-reader tests are part of
/// the suite, not optional.
pub fn venv_python() -> PathBuf {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let python = workspace.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup-test-deps.sh (scripts/test.sh does) to install DuckDB and pyarrow",
        python.display()
    );
    python
}

/// Path of a script under `<workspace>/scripts`.
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|workspace| workspace.join("scripts").join(name))
        .unwrap_or_default()
}
