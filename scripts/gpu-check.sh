#!/usr/bin/env bash
# Everything a GPU run of vigil must show, in one command that finishes in minutes (GPU time is
# lent by chance and is scarce): parity of `vigil infer` on the committed fixtures in f32 and
# bf16, `vigil bench` at the 2B shapes against transformers in the same run, decode at batch 1
# against the memory-bandwidth roofline, the fused attention self-check and attention time per
# layer fused vs reference (`vigil bench attention`). Writes OUT/summary.md and OUT/summary.json.
#
#   scripts/gpu-check.sh OUT                  # on the GPU machine (device cuda)
#   scripts/gpu-check.sh OUT --device cpu     # the same steps at a tiny size, here (a dry run)
#
# VIGIL picks the binary (default: target/release/vigil, else the one next to this script in a
# folder packed by scripts/pack-gpu.sh); PYTHON the interpreter with torch and transformers for
# the peer (default python3; without them the peer is skipped and said so).
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,14p' "$0"; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=$1
shift
device=cuda
while [ $# -gt 0 ]; do
  case $1 in
    --device) device=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
# A packed folder (scripts/pack-gpu.sh) carries the binary and its libraries compressed.
unpack='import lzma, shutil, sys, tarfile
if sys.argv[1].endswith(".tar.xz"):
    tarfile.open(sys.argv[1]).extractall(sys.argv[2])
else:
    shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))'
if [ -f "$root/vigil.xz" ] && [ ! -x "$root/vigil" ]; then
  "${PYTHON:-python3}" -c "$unpack" "$root/vigil.xz" "$root/vigil" && chmod +x "$root/vigil"
fi
if [ -f "$root/lib.tar.xz" ] && [ ! -d "$root/lib" ]; then
  "${PYTHON:-python3}" -c "$unpack" "$root/lib.tar.xz" "$root"
fi
vigil=${VIGIL:-}
if [ -z "$vigil" ]; then
  for c in "$root/target/release/vigil" "$root/vigil" "$root/target/debug/vigil"; do
    [ -x "$c" ] && { vigil=$c; break; }
  done
fi
[ -n "$vigil" ] || { echo "no vigil binary: build it (cargo build --release) or set VIGIL" >&2; exit 2; }
# A packed folder carries the GStreamer/GLib libraries the binary links, for a machine without them.
[ -d "$root/lib" ] && export LD_LIBRARY_PATH="$root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$out" --device "$device" --vigil "$vigil" --root "$root" --python "${PYTHON:-python3}"
