#!/usr/bin/env bash
# Builds coldgate and runs the demo: coldgate in front of its built-in simulated model
# server, which starts on the first request. Extra arguments go to `coldgate demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-build-deps.sh
cargo build --release --locked
exec target/release/coldgate demo "$@"
