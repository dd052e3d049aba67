#!/usr/bin/env bash
# Regenerates assets/demo.mp4, the clip the demo config plays: 12 s of a ball moving over a
# static background (so video-token pruning has work), 320×240 at 10 fps, H.264 in MP4.
set -euo pipefail
cd "$(dirname "$0")/.."
gst-launch-1.0 -q videotestsrc num-buffers=120 pattern=ball motion=wavy background-color=0xff204060 \
  ! video/x-raw,width=320,height=240,framerate=10/1 \
  ! x264enc speed-preset=slow bitrate=200 key-int-max=30 \
  ! video/x-h264,profile=main ! mp4mux ! filesink location=assets/demo.mp4
