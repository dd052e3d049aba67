"""Trains models/tiny-videollama3: a tiny VideoLLaMA3 that answers two questions about GStreamer's
`videotestsrc pattern=ball` clips.

Run from the repository root (options after `demo`; `demo --help` lists them):

    /work/pyref/bin/python tests/reference/make_checkpoints.py demo

Questions and answers (one word, then `<|im_end|>`):
  "What color is the ball?" -> red / green / blue / yellow / white
  "Is the ball moving?"     -> yes / no

The data is what `vigil run` feeds the model (ball_clips.py): clips rendered at their native size
and frame rate, raw or through H.264, sampled by `videorate` at 1 or 2 fps into windows of 2-8
frames with timestamps from 0, then transformers' VideoLlama3Processor (resize, patches, the
pruning mask that keeps only the video tokens that changed, the `Time t s:` prompt) with the
checkpoint's real chat template. Every weight is trained (vision tower, projector, language
model) with the loss on the answer and its end token only.

The initial checkpoint is tiny_model.build_checkpoint(CHECKPOINTS["demo"]): the tokenizer, chat
template and processor files of tiny_checkpoint.write_checkpoint("tf5") (the byte-level BPE
tokenizer with Qwen2's split regex and special tokens; the answers are plain ASCII byte-level
tokens), with the processor's pixel limits set for the demo: images up to 224 x 224 px, and a video
window shares 4 x 224 x 224 px among its frames (1024 patches whatever its length; up to 32
frames). Its weights are tiny_model's (placeholder, EOS and pad ids of the tokenizer; text 128
wide, vision 64 wide, 2 layers each), saved in f32 (about 2 MB); generation_config.json ends an
answer at `<|im_end|>`.

Everything is seeded: clips, model initialisation and batch order. The run is reproducible with
the same library versions, GStreamer and thread count (`--threads`, default 2). It prints the
accuracy per question on held-out clips, generated with another seed and answered by the saved
checkpoint reloaded through transformers (processor + generate, greedy).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict

import numpy as np
import torch
from transformers import AutoProcessor, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ball_clips  # noqa: E402
import tiny_model  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "models", "tiny-videollama3")
KEYS = ["input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "video_merge_sizes", "video_compression_mask"]


def processor_inputs(proc, frames: np.ndarray, fps: float, question: str) -> dict:
    conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    n = len(frames)
    meta = {"total_num_frames": n, "fps": float(fps), "frames_indices": list(range(n))}
    return proc(text=[text], videos=[list(frames)], video_metadata=[meta], return_tensors="pt")


def encode_window(proc, tok, frames: np.ndarray, spec: ball_clips.ClipSpec) -> dict:
    """One window, both questions: the processor's outputs (pixels kept as uint8) and answers."""
    sample = {"spec": spec, "ids": {}, "answer": {}}
    for key, question in ball_clips.QUESTIONS.items():
        inp = processor_inputs(proc, frames, spec.fps, question)
        sample["ids"][key] = inp["input_ids"][0]
        sample["answer"][key] = tok.encode(spec.answers()[key]) + [tok.eos_token_id]
        if "patches" not in sample:
            # Normalised with mean = std = 0.5: the uint8 pixel is recovered exactly.
            pv = inp["pixel_values_videos"]
            sample["patches"] = torch.round((pv * 0.5 + 0.5) * 255).to(torch.uint8)
            sample["grid"] = inp["video_grid_thw"][0]
            sample["mask"] = inp["video_compression_mask"]
    return sample


def make_dataset(seed: int, clips: int, proc, tok, label: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    data = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(clips):
            # Alternate frozen and moving clips so that both answers are equally common.
            spec = ball_clips.random_spec(rng, frozen=bool(i % 2))
            for frames in ball_clips.windows(spec, tmp):
                data.append(encode_window(proc, tok, frames, spec))
            if (i + 1) % 100 == 0:
                print(f"{label}: {i + 1}/{clips} clips, {len(data)} windows, {time.time() - t0:.0f} s", flush=True)
    return data


def collate(windows: list[dict], pad_id: int) -> dict:
    """Right-padded batch of every (window, question) row, labels on the answer tokens only.

    The windows' pixels appear once: `forward` runs the vision tower once per window and gives
    its features to both questions' rows.
    """
    seqs, labels = [], []
    for s in windows:
        for key in ball_clips.QUESTIONS:
            prompt = s["ids"][key].tolist()
            seqs.append(prompt + s["answer"][key])
            labels.append([-100] * len(prompt) + s["answer"][key])
    length = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), length), -100, dtype=torch.long)
    att = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, (x, y) in enumerate(zip(seqs, labels)):
        ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
        att[i, : len(x)] = 1
    return {
        "input_ids": ids,
        "attention_mask": att,
        "labels": lab,
        "pixel_values_videos": torch.cat([s["patches"] for s in windows]).to(torch.float32) / 255 * 2 - 1,
        "video_grid_thw": torch.stack([s["grid"] for s in windows]),
        "video_merge_sizes": torch.full((len(windows),), 2, dtype=torch.long),
        "masks": [s["mask"] for s in windows],
    }


def forward(model, batch: dict):
    """The model's loss on a `collate` batch, with one vision pass per window."""
    video = model.model.get_video_features(
        batch["pixel_values_videos"], batch["video_grid_thw"], batch["video_merge_sizes"], return_dict=True
    )
    per_window = video.pooler_output
    reps = len(ball_clips.QUESTIONS)
    video.pooler_output = tuple(f for f in per_window for _ in range(reps))
    mask = torch.cat([m for m in batch["masks"] for _ in range(reps)])
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
        mm_encoder_outputs={"video": video}, video_compression_mask=mask,
    ).loss


def train(model, data: list[dict], epochs: int, batch: int, lr: float, seed: int, pad_id: int) -> None:
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(data) / batch)
    warmup = max(1, min(100, steps // 10))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    step, t0 = 0, time.time()
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=g).tolist()
        total, n = 0.0, 0
        for b in range(0, len(order), batch):
            loss = forward(model, collate([data[i] for i in order[b : b + batch]], pad_id))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total, n, step = total + loss.item(), n + 1, step + 1
            if step % 100 == 0:
                print(f"epoch {epoch + 1} step {step}/{steps} loss {total / n:.4f} ({time.time() - t0:.0f} s)", flush=True)
        print(f"epoch {epoch + 1}: mean loss {total / max(n, 1):.4f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()


@torch.no_grad()
def evaluate(model, proc, tok, data: list[dict], verbose: bool = True) -> dict[str, float]:
    """Greedy answers of `model` on each window and question, as `vigil` asks them."""
    right: dict[str, int] = Counter()
    by_kind: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    failures = []
    for s in data:
        spec = s["spec"]
        for key in ball_clips.QUESTIONS:
            ids = s["ids"][key].unsqueeze(0)
            pixels = s["patches"].to(torch.float32) / 255 * 2 - 1
            inputs = {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "pixel_values_videos": pixels,
                "video_grid_thw": s["grid"].unsqueeze(0),
                "video_merge_sizes": torch.tensor([2]),
                "video_compression_mask": s["mask"],
            }
            out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
            new = out[0, ids.shape[1]:].tolist()
            text = tok.decode(new, skip_special_tokens=True)
            ok = text == spec.answers()[key] and new[-1] == tok.eos_token_id
            right[key] += ok
            kind = (key, spec.codec, "frozen" if spec.frozen else spec.motion, spec.frames)
            by_kind[kind][0] += ok
            by_kind[kind][1] += 1
            if not ok:
                failures.append((key, text, spec))
    acc = {k: right[k] / len(data) for k in ball_clips.QUESTIONS}
    if verbose:
        for k, (r, n) in sorted(by_kind.items()):
            if r < n:
                print(f"  {k}: {r}/{n}")
        for key, text, spec in failures[:20]:
            print(f"  wrong {key}: {text!r} for {spec}")
    return acc


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--clips", type=int, default=1200, help="training clips")
    ap.add_argument("--eval-clips", type=int, default=200, help="held-out clips")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="windows per step (two questions each)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", help="keep the encoded clips in this file (reused when it exists)")


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()

    tmp_ckpt = tempfile.mkdtemp()
    spec, model = tiny_model.build_checkpoint(tiny_model.CHECKPOINTS["demo"], tmp_ckpt)
    proc = AutoProcessor.from_pretrained(tmp_ckpt)
    tok = AutoTokenizer.from_pretrained(tmp_ckpt)
    if args.cache and os.path.exists(args.cache):
        train_data, eval_data = torch.load(args.cache, weights_only=False)
    else:
        train_data = make_dataset(args.seed, args.clips, proc, tok, "train")
        eval_data = make_dataset(args.seed + 1000, args.eval_clips, proc, tok, "held out")
        if args.cache:
            torch.save((train_data, eval_data), args.cache)
    t_data = time.time() - t0
    print(f"{len(train_data)} training windows, {len(eval_data)} held-out windows ({t_data:.0f} s)", flush=True)

    print(f"{sum(p.numel() for p in model.parameters())} parameters", flush=True)
    train(model, train_data, args.epochs, args.batch, args.lr, args.seed, tok.pad_token_id)
    t_train = time.time() - t0 - t_data

    shutil.rmtree(args.out, ignore_errors=True)
    shutil.copytree(tmp_ckpt, args.out)
    shutil.rmtree(tmp_ckpt)
    tiny_model.save_checkpoint(model, spec, args.out)  # the trained weights over the initial ones
    os.chmod(args.out, 0o755)
    for f in os.listdir(args.out):
        os.chmod(os.path.join(args.out, f), 0o644)
    reloaded = tiny_model.load_checkpoint(args.out)
    acc = evaluate(reloaded, proc, tok, eval_data)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out}: {size / 1e6:.2f} MB; data {t_data:.0f} s, training {t_train:.0f} s")
    print("held-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()) + f" ({len(eval_data)} windows)")
