#!/usr/bin/env bash
# Regenerates assets/demo.mp4, the clip the demo config plays: 12 s, 320×240 at 10 fps, H.264 in
# MP4, in three 4-second segments (one demo window each): a red ball moving, the same ball frozen
# where it stopped, a blue ball moving. The demo model answers "red"/"yes", "red"/"no",
# "blue"/"yes", so the moving alert rises and falls as the clip loops.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
w=320 h=240 rate=10 seg=40
frame=$((w * h * 3))
ball() { # colour, frames -> raw RGB of the ball's animation from its start
  gst-launch-1.0 -q videotestsrc pattern=ball motion=wavy foreground-color="$1" background-color=0xff204060 \
    num-buffers="$2" ! video/x-raw,format=RGB,width=$w,height=$h,framerate=$rate/1 ! filesink location="$3"
}
ball 0xffff0000 $seg "$tmp/red.rgb"
ball 0xff0000ff $((3 * seg)) "$tmp/blue.rgb"
{
  cat "$tmp/red.rgb"
  # The last red frame, held: every frozen frame is the same picture.
  for _ in $(seq $seg); do tail -c $frame "$tmp/red.rgb"; done
  # The blue ball where its animation is 8 s in, as if it had been moving all along.
  tail -c $((seg * frame)) "$tmp/blue.rgb"
} >"$tmp/clip.rgb"
# A key frame at each segment start (key-int-max = 40 frames): within a segment, frozen frames
# are coded as copies, so the frozen window really has no change.
gst-launch-1.0 -q filesrc location="$tmp/clip.rgb" \
  ! rawvideoparse format=rgb width=$w height=$h framerate=$rate/1 ! videoconvert ! video/x-raw,format=I420 \
  ! x264enc speed-preset=slow bitrate=300 key-int-max=$seg \
  ! video/x-h264,profile=main ! mp4mux ! filesink location=assets/demo.mp4
