#!/usr/bin/env bash
# The test command: fetches the real model fixtures once (target/fixtures/), then runs
# the whole suite. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-fixtures.sh
cargo test "$@"
