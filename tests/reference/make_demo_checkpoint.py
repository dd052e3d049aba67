"""Writes models/tiny-videollama3/: the random tiny checkpoint `config/demo.toml` runs on.

Run from the repository root:  /work/pyref/bin/python tests/reference/make_demo_checkpoint.py

A complete Hugging Face directory (tokenizer, processor_config.json, chat_template.jinja,
config.json, generation_config.json, model.safetensors in f32), built from the same pieces as the
parity fixtures: tiny_checkpoint.write_checkpoint (tokenizer / processor / real chat template,
transformers-5 layout) and tiny_model.spec_for_tokenizer (weights). Random weights: answers are
gibberish; it exists so the daemon runs end to end on a fresh clone, fast on a CPU.

Processor limits are raised to the demo's `max_frame_pixels = 50176` (224 x 224): a frame of that
size is patchified as is (16 x 16 patches of 14 px, 64 video tokens after the 2 x 2 merge), and
clips of up to 32 frames are accepted. The script reloads the result with transformers and
generates once, so the directory is known to be loadable by the reference implementation.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import torch
from transformers import AutoProcessor, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_checkpoint  # noqa: E402
import tiny_model  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "models", "tiny-videollama3")
MAX_FRAME_PIXELS = 50176  # config/demo.toml [defaults] max_frame_pixels
MAX_FRAMES = 32


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    tiny_checkpoint.write_checkpoint(OUT, "tf5")
    path = os.path.join(OUT, "processor_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["image_processor"]["size"] = {"shortest_edge": 14 * 14 * 8, "longest_edge": MAX_FRAME_PIXELS}
    # The video budget is per clip: transformers divides longest_edge by the frame count.
    cfg["video_processor"]["size"] = {"shortest_edge": 28 * 28, "longest_edge": MAX_FRAME_PIXELS * MAX_FRAMES}
    cfg["video_processor"]["max_frames"] = MAX_FRAMES
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)

    tok = AutoTokenizer.from_pretrained(OUT)
    spec = tiny_model.spec_for_tokenizer(tok, name="tiny-videollama3", base="tiny_a", patch_size=14, seed=7)
    model = tiny_model.make_checkpoint(spec, OUT)

    # Smoke test through transformers: 4 frames at the demo's largest size.
    proc = AutoProcessor.from_pretrained(OUT)
    frames = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe what is happening in the video."}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    inputs = proc(text=[text], videos=[frames], video_metadata=[{"total_num_frames": 4, "fps": 1.0, "frames_indices": [0, 1, 2, 3]}],
                  return_tensors="pt")
    assert inputs["video_grid_thw"].tolist() == [[4, 16, 16]], inputs["video_grid_thw"]
    keys = ["input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "video_merge_sizes", "video_compression_mask"]
    with torch.no_grad():
        out = model.generate(**{k: inputs[k] for k in keys}, do_sample=False, max_new_tokens=8)
    print("transformers generated", out[0, inputs["input_ids"].shape[1]:].tolist())
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {OUT}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
