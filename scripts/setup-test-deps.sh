#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust: a Python virtualenv in .venv with DuckDB and pyarrow (the
# standard readers our encrypted Parquet files are checked against) and moto (an AWS KMS server), SoftHSM2 (a
# PKCS#11 token, from Debian), and a real OpenID provider from npm in testkit/oidc/node_modules. Idempotent; safe to run on every test run.
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
sys.exit(0 if all(m.version(name.split("[")[0]) == version for name, version in wanted.items()) else 1)
PY
then
    .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
fi
# SoftHSM2, a PKCS#11 token, for the HSM key-provider tests (cli/tests/hsm_keys.rs).
if [ ! -e /usr/lib/softhsm/libsofthsm2.so ] || ! command -v softhsm2-util >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q softhsm2 >/dev/null || {
            apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q softhsm2 >/dev/null
        }
    elif command -v sudo >/dev/null; then
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q softhsm2 >/dev/null
    else
        echo "setup-test-deps: softhsm2 is missing; install it (Debian: apt-get install softhsm2)" >&2
        exit 1
    fi
fi
if ! command -v cargo-nextest >/dev/null; then
    cargo install --locked cargo-nextest
fi
# A real OpenID provider (node-oidc-provider, from the npm registry) for the sign-in tests, pinned by
# testkit/oidc/package-lock.json. Needs Node.js 20+ and npm (Debian: apt-get install nodejs npm).
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "setup-test-deps: node and npm not found; install Node.js 20+ (Debian: apt-get install nodejs npm)" >&2
    exit 1
fi
if ! cmp -s testkit/oidc/package-lock.json testkit/oidc/node_modules/.installed-lock.json 2>/dev/null; then
    npm ci --prefix testkit/oidc --no-audit --no-fund --loglevel=error
    cp testkit/oidc/package-lock.json testkit/oidc/node_modules/.installed-lock.json
fi
