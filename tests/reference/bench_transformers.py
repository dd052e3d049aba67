"""The transformers peer of `vigil bench --shape`: the same weights, frames, prompts and batches.

    vigil bench --shape 2b --random-weights --device cuda --save-weights W --json > vigil.json
    python tests/reference/bench_transformers.py --vigil vigil.json [--device cuda] [--json peer.json]

(`scripts/bench-vs-transformers.sh` runs both back to back.) It loads the checkpoint that vigil
wrote (`--save-weights`), rebuilds the synthetic frames from the formula in `src/bench/shapes.rs`
(and checks vigil's checksum of them), runs the same three measurements with
`VideoLlama3ForConditionalGeneration` (bf16 on a GPU, sdpa attention, flash_attention_2 when it
is importable), prints its figures with the same keys as vigil's report, then the ratios.

1. vision: `model.model.get_video_features` on stream 0's first window, median of 3;
2. single: processor + `generate` for (window 0, question 0): preprocess, vision, prefill
   (generate with 1 new token, minus vision), decode per token ((t(T) - t(1)) / (T - 1));
3. stream: for N streams, each round batches one window per stream × every question into one
   left-padded `generate` (the same composition as vigil's engine batches), W rounds; windows/s.

Generation is greedy for exactly `new_tokens` tokens: the checkpoint has no EOS, as for vigil.
"""

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import threading
import time

import numpy as np
import torch
from transformers import AutoProcessor, VideoLlama3ForConditionalGeneration

MODEL_KEYS = ["input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw",
              "video_merge_sizes", "video_compression_mask"]


def frames_of(s: int, k: int, w: dict) -> np.ndarray:
    """Window k of stream s: [frames, H, W, 3] uint8, the formula of src/bench/shapes.rs."""
    H, W, F = w["height"], w["width"], w["frames"]
    sc = int(np.floor(min(max(w["static_fraction"], 0.0), 1.0) * W))
    y = np.arange(H, dtype=np.int64)[:, None, None]
    x = np.arange(W, dtype=np.int64)[None, :, None]
    c = np.arange(3, dtype=np.int64)[None, None, :]
    out = []
    for i in range(k * F, (k + 1) * F):
        still = 3 * x + 5 * y + 50 * c + 7 * s
        moving = 5 * x + 3 * y + 50 * c + 7 * s + 37 * i
        out.append((np.where(x < sc, still, moving) % 256).astype(np.uint8))
    return np.stack(out)


def checksum(frames: np.ndarray) -> int:
    total = 0
    for f in frames:
        flat = f.reshape(-1).astype(np.int64)
        total += int((flat * (np.arange(flat.size, dtype=np.int64) % 251 + 1)).sum())
    return total % (1 << 64)


class Memory:
    """Peak GPU memory.used via nvidia-smi (what vigil samples), or peak RSS on the CPU."""

    def __init__(self, device: str):
        self.gpu = device.startswith("cuda")
        self.index = (device.split(":") + ["0"])[1] if self.gpu else None
        self.peak = 0
        self.stop = False
        if self.gpu and self.used() is not None:
            self.base = self.used()
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        else:
            self.gpu = False
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

    def used(self):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                  "-i", self.index], capture_output=True, text=True, timeout=10).stdout
            return int(out.strip())
        except Exception:
            return None

    def poll(self):
        while not self.stop:
            m = self.used()
            if m is not None:
                self.peak = max(self.peak, m)
            time.sleep(0.1)

    def finish(self):
        self.stop = True
        if self.gpu:
            self.thread.join()
            return float(max(self.peak - self.base, 0)), "nvidia-smi memory.used"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        return float(max(peak - self.base, 0)), "process peak RSS (ru_maxrss)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inputs_for(proc, w, windows, questions, device):
    """One conversation per (window, question), video then question, as vigil renders it."""
    texts, videos, metas = [], [], []
    for frames in windows:
        for q in questions:
            conv = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}]
            texts.append(proc.apply_chat_template(conv, add_generation_prompt=True))
            videos.append(frames)
            metas.append({"total_num_frames": len(frames), "fps": w["fps"],
                          "frames_indices": list(range(len(frames)))})
    out = proc(text=texts, videos=videos, video_metadata=metas, padding=True, padding_side="left",
               use_token_compression=w["pruning"], return_tensors="pt")
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in out.items() if k in MODEL_KEYS}


@torch.no_grad()
def generate(model, batch, n):
    return model.generate(**batch, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                          eos_token_id=None, pad_token_id=model.generation_config.pad_token_id)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vigil", required=True, help="vigil bench --json output (names the checkpoint and workload)")
    ap.add_argument("--device", default=None, help="default: vigil's device")
    ap.add_argument("--json", default=None, help="also write this report here")
    args = ap.parse_args()
    ours = json.load(open(args.vigil))
    w = ours["workload"]
    ckpt = ours["checkpoint"]
    if not os.path.isdir(ckpt):
        raise SystemExit(f"{ckpt}: not a directory; run vigil bench with --save-weights DIR")
    dev_name = args.device or ours["device"]
    device = torch.device("cuda:0" if dev_name == "cuda" else dev_name)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[ours["dtype"]]
    attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") and device.type == "cuda" else "sdpa"

    first = frames_of(0, 0, w)
    if checksum(first) != w["checksum"]:
        raise SystemExit(f"frames differ from vigil's: checksum {checksum(first)} != {w['checksum']}")
    mem = Memory(dev_name)
    t0 = time.perf_counter()
    proc = AutoProcessor.from_pretrained(ckpt)
    model = VideoLlama3ForConditionalGeneration.from_pretrained(ckpt, dtype=dtype, attn_implementation=attn)
    model = model.to(device).eval()
    sync(device)
    load_s = time.perf_counter() - t0
    questions = w["questions"]
    T = w["new_tokens"]

    # Warm-up (kernel selection, allocator), then 1: the vision tower alone.
    batch = inputs_for(proc, w, [first], questions[:1], device)
    generate(model, batch, 2)
    runs = []
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        feats = model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"],
                                               batch["video_merge_sizes"])
        sync(device)
        runs.append(time.perf_counter() - t)
    vision_s = sorted(runs)[1]
    feats = feats.pooler_output if hasattr(feats, "pooler_output") and feats.pooler_output is not None else feats
    if hasattr(feats, "last_hidden_state"):
        feats = feats.last_hidden_state
    n_visual = sum(int(f.shape[0]) for f in (feats if isinstance(feats, (list, tuple)) else [feats]))
    vision = {"ms": vision_s * 1e3, "visual_tokens": n_visual, "tflops": ours["vision"]["tflops"],
              "tflop_per_s": ours["vision"]["tflops"] / vision_s}

    # 2: one window, one question.
    t = time.perf_counter()
    batch = inputs_for(proc, w, [first], questions[:1], device)
    sync(device)
    prep_s = time.perf_counter() - t
    t = time.perf_counter()
    generate(model, batch, 1)
    sync(device)
    one_s = time.perf_counter() - t
    t = time.perf_counter()
    out = generate(model, batch, T)
    sync(device)
    full_s = time.perf_counter() - t
    steps = max(T - 1, 1)
    decode_s = max(full_s - one_s, 1e-9)
    ids = batch["input_ids"][0]
    vtok = model.config.video_token_id
    mask = batch.get("video_compression_mask")
    single = {
        "prompt_tokens": int(ids.numel()),
        "visual_tokens_total": int(mask.numel()) if mask is not None else int((ids == vtok).sum()),
        "visual_tokens_kept": int((ids == vtok).sum()),
        "preprocess_and_vision_ms": (prep_s + vision_s) * 1e3,
        "prefill_ms": max(one_s - vision_s, 0.0) * 1e3,
        "decode_ms": decode_s * 1e3,
        "generated": int(out.shape[1] - ids.numel()),
        "decode_ms_per_token": decode_s * 1e3 / steps,
        "decode_tok_per_s": steps / decode_s,
        "decode_weight_gb_per_s": steps / decode_s * ours["text_weight_bytes"] / 1e9,
        "total_s": prep_s + full_s,
        "tokens": [int(t) for t in out[0, ids.numel():]],
    }

    # 3: serving, one batched generate per round (a window of every stream × every question).
    stream = []
    # transformers' DynamicCache holds every row's keys and values for the padded prompt plus the
    # new tokens: its size at the largest batch is the run's KV peak.
    tc = model.config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv_per_token = tc.num_hidden_layers * 2 * tc.num_key_value_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
    kv_peak = 0
    for n in w["streams"]:
        rounds = [[frames_of(s, k + 1, w) for s in range(n)] for k in range(w["windows"])]
        sync(device)
        t = time.perf_counter()
        prep = 0.0
        kept = total = 0
        for wins in rounds:
            tp = time.perf_counter()
            batch = inputs_for(proc, w, wins, questions, device)
            prep += time.perf_counter() - tp
            kept += int((batch["input_ids"] == model.config.video_token_id).sum()) // len(questions)
            m = batch.get("video_compression_mask")
            total += (int(m.numel()) if m is not None else 0) // len(questions)
            generate(model, batch, T)
            rows, length = batch["input_ids"].shape
            kv_peak = max(kv_peak, rows * (length + T) * kv_per_token)
        sync(device)
        secs = time.perf_counter() - t
        nw = n * w["windows"]
        stream.append({"streams": n, "windows": nw, "prompts_per_window": len(questions), "seconds": secs,
                       "windows_per_s": nw / secs, "generated_tok_per_s": nw * len(questions) * T / secs,
                       "preprocess_ms": int(prep * 1e3), "batches": w["windows"],
                       "mean_batch": float(n * len(questions)), "visual_tokens_total": total,
                       "visual_tokens_kept": kept})
        print(f"[peer] {n} streams: {nw / secs:.2f} windows/s", flush=True)

    peak, source = mem.finish()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    kv = kv_peak / 2**20
    report = {"implementation": f"transformers {__import__('transformers').__version__} / torch {torch.__version__} ({attn})",
              "shape": ours["shape"], "checkpoint": ckpt, "device": dev_name, "dtype": ours["dtype"],
              "parameters": sum(p.numel() for p in model.parameters()),
              "text_weight_bytes": ours["text_weight_bytes"], "workload": w, "load_s": load_s,
              "vision": vision, "single": single, "stream": stream,
              "memory_peak_mib": peak, "memory_source": source, "memory_weights_mib": weights,
              "memory_kv_cache_mib": kv, "memory_activations_mib": max(peak - weights - kv, 0.0)}
    if args.json:
        json.dump(report, open(args.json, "w"), indent=2)
    print_comparison(ours, report)
    a, b = ours["single"]["tokens"], single["tokens"]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    print(f"greedy tokens of (window 0, question 0): {same} of {len(b)} equal before the first difference"
          + (" (identical)" if a == b else ""))
    bad = [f"{n} streams" for a, b in zip(ours["stream"], report["stream"])
           for n in [a["streams"]] if a["visual_tokens_kept"] != b["visual_tokens_kept"]]
    if single["visual_tokens_kept"] != ours["single"]["visual_tokens_kept"] or bad:
        raise SystemExit(f"the workloads differ: visual tokens kept differ ({bad or 'single'})")


def print_comparison(ours, peer):
    rows = [("vision tower, ms per window (lower is better)", ours["vision"]["ms"], peer["vision"]["ms"], False),
            ("vision TFLOP/s", ours["vision"]["tflop_per_s"], peer["vision"]["tflop_per_s"], True),
            ("batch 1: prefill ms", ours["single"]["prefill_ms"], peer["single"]["prefill_ms"], False),
            ("batch 1: decode ms per token", ours["single"]["decode_ms_per_token"],
             peer["single"]["decode_ms_per_token"], False),
            ("batch 1: whole request s", ours["single"]["total_s"], peer["single"]["total_s"], False)]
    for a, b in zip(ours["stream"], peer["stream"]):
        rows.append((f"{a['streams']} streams: windows/s", a["windows_per_s"], b["windows_per_s"], True))
        rows.append((f"{a['streams']} streams: generated tok/s", a["generated_tok_per_s"],
                     b["generated_tok_per_s"], True))
    rows.append(("memory peak MiB", ours["memory_peak_mib"], peer["memory_peak_mib"], False))
    for key, name in [("weights", "weights"), ("kv_cache", "KV cache"), ("activations", "activations and runtime")]:
        rows.append((f"  of which {name} MiB", ours.get(f"memory_{key}_mib", 0.0), peer[f"memory_{key}_mib"], False))
    print(f"\n{ours['shape']} on {ours['device']} {ours['dtype']}: vigil vs {peer['implementation']}")
    print(f"{'measure':<48} {'vigil':>10} {'peer':>10}  vigil advantage")
    for name, a, b, higher in rows:
        ratio = (a / b if higher else b / a) if a and b else float("nan")
        print(f"{name:<48} {a:>10.2f} {b:>10.2f}  {ratio:6.2f}x")


if __name__ == "__main__":
    main()
