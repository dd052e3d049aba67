#!/usr/bin/env bash
# The demo on a fresh machine: no camera, GPU or broker needed. Builds vigil, runs the daemon on
# config/demo.toml (the tiny demo model, bundled clip, embedded broker, CPU) and shows the
# answers as they arrive with `vigil tail`. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --locked   # dev profile: dependencies are optimised (see Cargo.toml), and shared with `cargo test`
bin=target/debug/vigil
$bin check --config config/demo.toml
$bin run --config config/demo.toml &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null' EXIT INT TERM
sleep 2
kill -0 $daemon 2>/dev/null || { wait $daemon; exit 1; }
$bin tail --config config/demo.toml
