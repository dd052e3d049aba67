"""Builds every complete tiny VideoLLaMA3 checkpoint of the repository, from the specs in
tiny_model.CHECKPOINTS through tiny_model.build_checkpoint (processor files of tiny_checkpoint,
weights of tiny_model sized to the tokenizer).

Run from the repository root:

    /work/pyref/bin/python tests/reference/make_checkpoints.py engine   # tests/fixtures/engine/ckpt
    /work/pyref/bin/python tests/reference/make_checkpoints.py infer    # tests/fixtures/infer/
    /work/pyref/bin/python tests/reference/make_checkpoints.py demo     # models/tiny-videollama3

engine: the checkpoint alone. The engine tests compare the engine against the same checkpoint
run one request at a time in Rust, so no transformers outputs are stored.

infer: end-to-end parity for `vigil infer`, two checkpoints and what transformers generates from
them:

  * ckpt_tf5:    processor_config.json + chat_template.jinja, model from tiny_a (tied embeddings,
                 rope_parameters, single model.safetensors)
  * ckpt_legacy: preprocessor_config.json + video_preprocessor_config.json + chat_template.json,
                 model from tiny_b (untied, top-level rope_theta, sharded safetensors)

Requests reuse the processor fixtures' media (tests/fixtures/processor/media) and are run the way
`vigil infer` builds them: media before the text in one user turn (images, then --video, then
--frames), chat template with the generation prompt, then
`model.generate(do_sample=False, max_new_tokens=16)`; once per request and once as one
left-padded batch of all of them. generation_config.json gets a second EOS id that only the
video_frames answer emits, mid-way, so the batch has a row that stops early. Weight seeds are
retried until every greedy step's top-1/top-2 gap is at least MIN_GAP, so token equality is not a
coin flip on round-off.

demo: the initial checkpoint, then trained by train_demo_model.py (its options follow `demo`;
`demo --help` lists them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import av
import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, GenerationConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_model  # noqa: E402
import train_demo_model  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ENGINE_OUT = os.path.join(ROOT, "tests", "fixtures", "engine", "ckpt")
INFER_OUT = os.path.join(ROOT, "tests", "fixtures", "infer")
MEDIA = "../processor/media"  # relative to INFER_OUT (where the tests run `vigil infer`)
MAX_NEW_TOKENS = 16
MIN_GAP = 1e-3
MODEL_KEYS = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "image_merge_sizes",
              "pixel_values_videos", "video_grid_thw", "video_merge_sizes", "video_compression_mask"]

# One request per case, in the jsonl schema of `vigil infer --batch` (paths relative to INFER_OUT).
REQUESTS = {
    "image": {"prompt": "Describe the image.", "images": [f"{MEDIA}/down.png"]},
    "video_frames": {"prompt": "What is shown in this video?",
                     "frames": [f"{MEDIA}/clip_moving_{i}.png" for i in range(4)], "fps": 2.0},
    "video_file": {"prompt": "Is anyone at the door?", "video": f"{MEDIA}/clip12.mkv", "fps": 2.0},
    "text": {"prompt": "The quick brown fox jumps over the lazy dog."},
    "image_and_frames": {"prompt": "Describe this.", "images": [f"{MEDIA}/odd.png"],
                         "frames": [f"{MEDIA}/clip_static_{i}.png" for i in range(4)], "fps": 2.0},
}


def args_of(req: dict) -> list[str]:
    """The `vigil infer` arguments for a request."""
    a = []
    for p in req.get("images", []):
        a += ["--image", p]
    if "video" in req:
        a += ["--video", req["video"]]
    if "frames" in req:
        a += ["--frames", *req["frames"]]
    if "fps" in req:
        a += ["--fps", str(req["fps"])]
    return a + ["--prompt", req["prompt"]]


def decode_file(path: str):
    with av.open(path) as c:
        s = c.streams.video[0]
        fps = float(s.average_rate)
        frames = np.stack([fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)])
    return frames, fps


def media_of(proc, req: dict):
    """(content parts, images, videos, video metadata) as `vigil infer` builds them."""
    parts, images, videos, metas = [], [], [], []
    for p in req.get("images", []):
        images.append(Image.open(os.path.join(INFER_OUT, p)))
        parts.append({"type": "image"})
    if "video" in req:
        frames, fps = decode_file(os.path.join(INFER_OUT, req["video"]))
        md = {"total_num_frames": len(frames), "fps": fps, "duration": len(frames) / fps,
              "frames_indices": list(range(len(frames)))}
        out = proc.video_processor(videos=[frames], video_metadata=[dict(md)], do_sample_frames=True,
                                   fps=req["fps"], return_tensors="pt")
        idx = [int(i) for i in out["video_metadata"][0].frames_indices]
        videos.append(frames[idx])
        metas.append({"total_num_frames": len(frames), "fps": fps, "frames_indices": idx})
        parts.append({"type": "video"})
    if "frames" in req:
        frames = np.stack([np.asarray(Image.open(os.path.join(INFER_OUT, p)).convert("RGB")) for p in req["frames"]])
        videos.append(frames)
        metas.append({"total_num_frames": len(frames), "fps": req["fps"], "frames_indices": list(range(len(frames)))})
        parts.append({"type": "video"})
    parts.append({"type": "text", "text": req["prompt"]})
    return parts, images, videos, metas


@torch.no_grad()
def run(model, proc, reqs: list[dict]) -> tuple[list[dict], float]:
    texts, images, videos, metas = [], [], [], []
    for r in reqs:
        parts, ims, vids, mds = media_of(proc, r)
        texts.append(proc.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True))
        images += ims
        videos += vids
        metas += mds
    kw = dict(text=texts, padding=True, padding_side="left", return_tensors="pt")
    if images:
        kw["images"] = images
    if videos:
        kw["videos"] = videos
        kw["video_metadata"] = metas
    inputs = proc(**kw)
    batch = {k: inputs[k] for k in MODEL_KEYS if k in inputs}
    gen = model.generate(**batch, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                         output_scores=True, return_dict_in_generate=True)
    L = batch["input_ids"].shape[1]
    new = gen.sequences[:, L:]
    scores = torch.stack(gen.scores, dim=0)  # [steps, B, V]
    eos = set(model.generation_config.eos_token_id)
    results, min_gap = [], float("inf")
    vmask = inputs.get("video_compression_mask")
    for b in range(len(reqs)):
        toks = []
        for s in range(new.shape[1]):
            t = int(new[b, s])
            top = scores[s, b].topk(2).values
            min_gap = min(min_gap, float(top[0] - top[1]))
            toks.append(t)
            if t in eos:
                break
        am = batch["attention_mask"][b]
        ids = [int(x) for x, m in zip(batch["input_ids"][b], am) if int(m) == 1]
        res = {
            "input_ids": ids,
            "prompt_tokens": len(ids),
            "token_ids": toks,
            "text": proc.tokenizer.decode(toks, skip_special_tokens=True),
            "video_tokens_kept": sum(1 for t in ids if t == model.config.video_token_id),
        }
        results.append(res)
    if len(reqs) == 1:
        results[0]["video_tokens_total"] = int(vmask.numel()) if vmask is not None else 0
    return results, min_gap


def build_infer(layout: str, attempt: int) -> dict:
    d = os.path.join(INFER_OUT, f"ckpt_{layout}")
    ckpt = tiny_model.CHECKPOINTS[f"infer_{layout}"]
    spec, _ = tiny_model.build_checkpoint(dataclasses.replace(ckpt, seed=ckpt.seed + 100 * attempt), d)
    model = tiny_model.load_checkpoint(d)
    proc = AutoProcessor.from_pretrained(d)

    # A second EOS id that only the video_frames answer produces, mid-way: the batch then has a
    # row that stops early (transformers feeds it pad tokens) while the others run on.
    singles = {name: run(model, proc, [req])[0][0]["token_ids"] for name, req in REQUESTS.items()}
    for name, toks in singles.items():
        if len(set(toks)) < 5:
            raise GapTooSmall(f"{layout}: {name} answer is degenerate: {toks}")
    vf = singles["video_frames"]
    stop = next((t for s, t in enumerate(vf) if s >= 4 and t not in vf[:s]
                 and all(t not in o for n, o in singles.items() if n != "video_frames")), None)
    if stop is None:
        raise GapTooSmall(f"{layout}: no token to stop video_frames early")
    gen_cfg = GenerationConfig.from_pretrained(d)
    gen_cfg.eos_token_id = list(spec.eos_token_ids) + [int(stop)]
    gen_cfg.save_pretrained(d)
    model = tiny_model.load_checkpoint(d)

    out = {"cases": {}, "seed": spec.seed, "eos_token_ids": gen_cfg.eos_token_id}
    gap = float("inf")
    for name, req in REQUESTS.items():
        [res], g = run(model, proc, [req])
        gap = min(gap, g)
        res["args"] = args_of(req)
        res["stopped_on_eos"] = res["token_ids"][-1] in gen_cfg.eos_token_id
        out["cases"][name] = res
    assert out["cases"]["video_frames"]["stopped_on_eos"], out["cases"]["video_frames"]
    batch, g = run(model, proc, list(REQUESTS.values()))
    gap = min(gap, g)
    for name, res in zip(REQUESTS, batch):
        if res["token_ids"] != out["cases"][name]["token_ids"]:
            raise GapTooSmall(f"{layout}: transformers' batch differs from single for {name}")
        res["stopped_on_eos"] = out["cases"][name]["stopped_on_eos"]
    out["batch"] = {"jsonl": "batch.jsonl", "order": list(REQUESTS), "results": batch}
    out["min_top2_gap"] = gap
    # The pruned cases must actually drop tokens, or the test proves nothing about pruning.
    for name in ["video_frames", "image_and_frames"]:
        c = out["cases"][name]
        assert c["video_tokens_kept"] < c["video_tokens_total"], (name, c["video_tokens_kept"])
    if gap < MIN_GAP:
        raise GapTooSmall(f"{layout}: top-1/top-2 gap {gap:.2e} below {MIN_GAP}")
    return out


class GapTooSmall(Exception):
    pass


def make_engine(_args) -> None:
    tiny_model.build_checkpoint(tiny_model.CHECKPOINTS["engine"], ENGINE_OUT)
    print("wrote", ENGINE_OUT, sorted(os.listdir(ENGINE_OUT)))


def make_infer(_args) -> None:
    os.makedirs(INFER_OUT, exist_ok=True)
    import transformers
    expected = {"transformers": transformers.__version__, "torch": torch.__version__,
                "max_new_tokens": MAX_NEW_TOKENS, "layouts": {}}
    with open(os.path.join(INFER_OUT, "batch.jsonl"), "w") as f:
        for req in REQUESTS.values():
            f.write(json.dumps(req) + "\n")
    for layout in ["tf5", "legacy"]:
        for attempt in range(20):
            try:
                expected["layouts"][layout] = build_infer(layout, attempt)
                break
            except GapTooSmall as e:
                print(f"{layout}: attempt {attempt}: {e}; retrying")
        else:
            raise SystemExit(f"{layout}: no seed gave clear greedy winners")
        lay = expected["layouts"][layout]
        for name, c in lay["cases"].items():
            print(f"{layout:6s} {name:16s} prompt {c['prompt_tokens']:4d} tokens {c['token_ids']}")
        print(f"{layout}: min gap {lay['min_top2_gap']:.3e}")
    with open(os.path.join(INFER_OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(INFER_OUT) for fn in fns)
    print(f"wrote {INFER_OUT}: {total / 1e6:.2f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="target", required=True)
    sub.add_parser("engine", help="tests/fixtures/engine/ckpt (~5 s)").set_defaults(run=make_engine)
    sub.add_parser("infer", help="tests/fixtures/infer/ (~10 s)").set_defaults(run=make_infer)
    demo = sub.add_parser("demo", help="models/tiny-videollama3, trained (about 25 min on 2 cores)",
                          description=train_demo_model.__doc__.split("\n\n")[0])
    train_demo_model.add_arguments(demo)
    demo.set_defaults(run=train_demo_model.main)
    args = ap.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
