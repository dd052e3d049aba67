#!/usr/bin/env bash
# Packs what a GPU check needs into one folder to carry to the GPU machine (which has no Rust,
# no network and perhaps no GStreamer): the stripped binary, the shared libraries it links
# beyond glibc (GStreamer, GLib and theirs, into lib/), the check scripts, the committed
# parity fixtures, the engine's tiny checkpoint and the transformers peer, compressed to stay
# under the 64 MiB carry limit.
#
#   scripts/pack-gpu.sh [BINARY] [DIR]     # default: target/release/vigil into .gpu/
#
# On the GPU machine:  cd .gpu && ./scripts/gpu-check.sh OUT
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/vigil}
dir=${2:-.gpu}
[ -x "$bin" ] || { echo "no binary at $bin" >&2; exit 2; }
rm -rf "$dir"
mkdir -p "$dir/lib" "$dir/scripts" "$dir/tests/fixtures/processor" "$dir/tests/reference"
cp "$bin" "$dir/vigil"
strip "$dir/vigil" 2>/dev/null || true
# glibc, the loader and libgcc stay the machine's own; everything else the binary links goes along.
ldd "$bin" | awk '$3 ~ /^\// {print $3}' | grep -vE '/(libc|libm|libdl|librt|libpthread|libgcc_s|ld-linux[^/]*)\.so' \
  | while read -r lib; do cp -L "$lib" "$dir/lib/"; done
cp scripts/gpu-check.sh scripts/gpu_check.py "$dir/scripts/"
cp -r tests/fixtures/infer tests/fixtures/engine "$dir/tests/fixtures/"
cp -r tests/fixtures/processor/media "$dir/tests/fixtures/processor/"
cp tests/reference/bench_transformers.py "$dir/tests/reference/"
# Compressed to fit the carry limit (a CUDA binary alone is ~63 MB); gpu-check.sh unpacks them
# with Python's standard library on the GPU machine.
xz -T2 -6 "$dir/vigil"
tar -C "$dir" -cJf "$dir/lib.tar.xz" lib && rm -rf "$dir/lib"
du -sh "$dir"
