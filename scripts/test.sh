#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine, then runs the whole test suite.
#   - cmake: pingora-core builds zlib-ng through it.
#   - a Python venv with KServe and scikit-learn for the end-to-end test with a real
#     model server (scripts/setup-venv.sh; skipped when it is already up to date).
#   - kubectl's kustomize and a small venv with kubernetes-validate, to build and validate
#     the manifests in deploy/ (scripts/check-deploy.sh).
#   - Debian's prometheus package, to check the alert rules with promtool and to run every
#     dashboard query against a live coldgate (scripts/check-monitoring.sh).
#   - nginx and wrk (scripts/bench-deps.sh), so that the benchmarks' smoke runs, which
#     `cargo test --all-targets` includes, compare with nginx instead of skipping it.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-build-deps.sh
# Headless Chromium renders the admin status page in tests/admin.rs.
command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
scripts/setup-venv.sh .venv-kserve
export COLDGATE_KSERVE_PYTHON="$PWD/.venv-kserve/bin/python"
scripts/check-deploy.sh
scripts/check-monitoring.sh
scripts/bench-deps.sh

cargo test --locked --all-targets "$@"
