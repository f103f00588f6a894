#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust: a Python virtualenv in .venv with DuckDB and pyarrow (the
# standard readers our encrypted Parquet files are checked against). Idempotent; safe to run on every test run.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null; then
    echo "setup-test-deps: $python not found; install Python 3.9+ (Debian: apt-get install python3 python3-venv)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv || {
        echo "setup-test-deps: creating the virtualenv failed (Debian: apt-get install python3-venv)" >&2
        exit 1
    }
fi
if ! .venv/bin/python - <<'PY' 2>/dev/null
import importlib.metadata as m, sys
wanted = dict(line.strip().split("==") for line in open("scripts/requirements-test.txt") if "==" in line and not line.startswith("#"))
sys.exit(0 if all(m.version(name) == version for name, version in wanted.items()) else 1)
PY
then
    .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
fi
if ! command -v cargo-nextest >/dev/null; then
    cargo install --locked cargo-nextest
fi
