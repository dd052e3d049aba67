"""The demo model's world: GStreamer `videotestsrc pattern=ball` clips, decoded and cut into
windows the way `vigil run` does.

A clip is one ball (`foreground-color`) on a plain dark background (`background-color`), moving
(`motion=wavy|sweep|hsweep`, starting at any frame of the animation) or frozen (one frame of the
animation, repeated). It is rendered at its native size and frame rate, optionally through H.264
(x264enc → avdec_h264, with the codec's own artefacts), and then sampled exactly as the daemon's
ingest does it: `videorate skip-to-first=true ! videoconvert ! video/x-raw,format=RGB,framerate=F`
at the native size. Windows are consecutive runs of `frames` samples whose timestamps restart at
0 (`i / fps`), as `vigil run` gives them to the model; the processor then resizes, patchifies and
prunes them.

Used by train_demo_model.py (training and held-out clips); the Rust test tests/demo_accuracy.rs
generates its own clips with GStreamer at test time.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np

COLORS = ["red", "green", "blue", "yellow", "white"]
MOTIONS = ["wavy", "sweep", "hsweep"]
QUESTIONS = {"color": "What color is the ball?", "moving": "Is the ball moving?"}


@dataclass
class ClipSpec:
    width: int
    height: int
    rate: int  # native frames per second
    fps: int  # sampling rate of the windows (1 or 2)
    frames: int  # frames per window
    windows: int  # windows cut from the clip
    color: str
    fg: tuple[int, int, int]
    bg: tuple[int, int, int]
    motion: str  # animation of the source (a frozen clip repeats one frame of it)
    frozen: bool
    start: int  # first animation frame used
    codec: str  # "raw" or "h264"
    key_int: int = 0  # x264enc key-int-max (0 = its default)
    bitrate: int = 2048  # x264enc kbit/s
    preset: str = "ultrafast"

    @property
    def seconds(self) -> float:
        return self.frames * self.windows / self.fps

    def answers(self) -> dict[str, str]:
        return {"color": self.color, "moving": "no" if self.frozen else "yes"}


def argb(rgb: tuple[int, int, int]) -> str:
    r, g, b = rgb
    return f"0xff{r:02x}{g:02x}{b:02x}"


def ball_color(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """A shade of a named colour: its strong channels in [180, 255], weak ones in [0, 70]
    (white: all three in [200, 255])."""
    hi = lambda: int(rng.integers(180, 256))  # noqa: E731
    lo = lambda: int(rng.integers(0, 71))  # noqa: E731
    return {
        "red": (hi(), lo(), lo()),
        "green": (lo(), hi(), lo()),
        "blue": (lo(), lo(), hi()),
        "yellow": (hi(), hi(), lo()),
        "white": tuple(int(v) for v in rng.integers(200, 256, 3)),
    }[name]


def dark_background(rng: np.random.Generator) -> tuple[int, int, int]:
    """Black (a third of the time) or a dark colour: every channel at most 100."""
    if rng.random() < 1 / 3:
        return (0, 0, 0)
    return tuple(int(v) for v in rng.integers(0, 101, 3))


def random_spec(rng: np.random.Generator, frozen: bool | None = None) -> ClipSpec:
    # Width and height are multiples of 8 (unpadded RGB rows, even I420 planes).
    w = 160 + 8 * int(rng.integers(0, 61))
    h = 120 + 8 * int(rng.integers(0, 46))
    while not 0.5 <= w / h <= 2.0:
        h = 120 + 8 * int(rng.integers(0, 46))
    fps = int(rng.choice([1, 2]))
    frozen = bool(rng.random() < 0.45) if frozen is None else frozen
    codec = "h264" if rng.random() < 0.6 else "raw"
    rate = int(rng.integers(5, 31))
    color = COLORS[int(rng.integers(len(COLORS)))]
    return ClipSpec(
        width=w,
        height=h,
        rate=rate,
        fps=fps,
        frames=int(rng.integers(2, 9)),
        windows=int(rng.integers(1, 3)),
        color=color,
        fg=ball_color(color, rng),
        bg=dark_background(rng),
        motion=MOTIONS[int(rng.integers(len(MOTIONS)))],
        frozen=frozen,
        start=0 if rng.random() < 0.4 else int(rng.integers(0, 200)),
        codec=codec,
        key_int=int(rng.choice([0, rate, 2 * rate, 3 * rate])),
        bitrate=int(rng.choice([300, 700, 1500, 2048])),
        preset=str(rng.choice(["ultrafast", "veryfast", "medium"])),
    )


def _launch(desc: str) -> None:
    subprocess.run(["gst-launch-1.0", "-q", *desc.split()], check=True, stdout=subprocess.DEVNULL)


def render(spec: ClipSpec, tmp: str) -> np.ndarray:
    """Frames of the clip as the daemon samples them: (n, height, width, 3) uint8 RGB."""
    w, h = spec.width, spec.height
    size = w * h * 3
    n = int(round(spec.seconds * spec.rate))
    src = os.path.join(tmp, "src.rgb")
    animation = spec.start + (1 if spec.frozen else n)
    _launch(
        f"videotestsrc pattern=ball motion={spec.motion} foreground-color={argb(spec.fg)} "
        f"background-color={argb(spec.bg)} num-buffers={animation} "
        f"! video/x-raw,format=RGB,width={w},height={h},framerate={spec.rate}/1 ! filesink location={src}"
    )
    raw = np.fromfile(src, np.uint8)
    assert raw.size == animation * size, (raw.size, animation, size)
    frames = raw.reshape(animation, size)[spec.start:]
    if spec.frozen:
        frames = np.repeat(frames, n, axis=0)
    clip = os.path.join(tmp, "clip.rgb")
    frames.tofile(clip)
    if spec.codec == "h264":
        key = f" key-int-max={spec.key_int}" if spec.key_int else ""
        codec = (
            f"! videoconvert ! video/x-raw,format=I420 ! x264enc speed-preset={spec.preset} "
            f"bitrate={spec.bitrate}{key} ! h264parse ! avdec_h264 "
        )
    else:
        codec = ""
    out = os.path.join(tmp, "out.rgb")
    _launch(
        f"filesrc location={clip} ! rawvideoparse format=rgb width={w} height={h} framerate={spec.rate}/1 "
        f"{codec}! videorate skip-to-first=true ! videoconvert "
        f"! video/x-raw,format=RGB,framerate={spec.fps}/1 ! filesink location={out}"
    )
    sampled = np.fromfile(out, np.uint8)
    return sampled.reshape(-1, h, w, 3)


def windows(spec: ClipSpec, tmp: str | None = None) -> list[np.ndarray]:
    """The clip's complete windows (each (frames, h, w, 3)), as `vigil run` would emit them."""
    if tmp is None:
        with tempfile.TemporaryDirectory() as d:
            return windows(spec, d)
    frames = render(spec, tmp)
    k = spec.frames
    return [frames[i * k:(i + 1) * k] for i in range(spec.windows) if (i + 1) * k <= len(frames)]
