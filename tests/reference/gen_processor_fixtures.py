"""Writes tests/fixtures/processor/: tiny checkpoints, media and transformers' expected outputs.

Run from the repository root:  /work/pyref/bin/python tests/reference/gen_processor_fixtures.py
Expected outputs are produced by transformers' own VideoLlama3Processor / image / video processors;
float tensors are stored as little-endian f32 `.bin` files, everything else in `expected.json`.
"""
import json
import os
import sys

import av
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import tiny_checkpoint  # noqa: E402

from transformers import AutoProcessor, VideoLlama3ImageProcessorPil  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "processor")
MEDIA = os.path.join(ROOT, "media")
OUT = os.path.join(ROOT, "expected")
rng = np.random.default_rng(1234)


def smooth_image(h, w, channels=3, noise=40):
    """Gradients + noise: exercises the resize kernels on both smooth and high-frequency content."""
    y, x = np.mgrid[0:h, 0:w]
    base = [(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 127 // max(w + h - 2, 1))]
    base = np.stack([base[c % 3] for c in range(channels)], axis=-1).astype(np.int32)
    base = base + rng.integers(-noise, noise + 1, size=base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def formula_image(h, w):
    """Deterministic test pattern, also computed by the Rust test: sharp edges + ramps."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    c = np.arange(3).reshape(1, 1, 3)
    v = (x[..., None] * 7 + y[..., None] * 13 + c * 50 + (x[..., None] * y[..., None]) % 17 * 9) % 256
    return v.astype(np.uint8)


def save_f32(name, arr):
    arr = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
    arr.astype("<f4").tofile(os.path.join(OUT, name))
    return {"file": name, "shape": list(arr.shape)}


def tolist(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def make_media():
    os.makedirs(MEDIA, exist_ok=True)
    images = {
        "down": Image.fromarray(smooth_image(120, 160)),          # 19200 px > max_pixels -> downscale
        "up": Image.fromarray(smooth_image(20, 30)),              # 600 px < min_pixels -> upscale
        "odd": Image.fromarray(smooth_image(43, 57)),             # odd sizes, rounding of smart_resize
        "wide": Image.fromarray(smooth_image(8, 300)),            # aspect 37.5
        "gray": Image.fromarray(smooth_image(48, 64, 1)[..., 0], mode="L"),
        "rgba": Image.fromarray(np.concatenate([smooth_image(70, 50), (np.arange(70 * 50).reshape(70, 50, 1) % 256).astype(np.uint8)], axis=-1), mode="RGBA"),
        "exact": Image.fromarray(smooth_image(56, 84)),           # already a multiple of 14: no resize
        "bad_aspect": Image.fromarray(smooth_image(1, 250)),      # aspect 250 > 200 -> error
        # Both sides shrink, the height much more: Pillow 13 resizes vertically first here.
        "tall": Image.fromarray(smooth_image(160, 40)),
        "tall_tie": Image.fromarray(smooth_image(150, 40)),       # 2*(40-28) == 150-126: order tie
    }
    for k, im in images.items():
        im.save(os.path.join(MEDIA, f"{k}.png"))
    # Reload from disk so that exactly the committed bytes are what transformers sees.
    return {k: Image.open(os.path.join(MEDIA, f"{k}.png")) for k in images}


def moving_clip(t, h, w, static=False):
    """Static textured background; a bright square moves right each frame (unless static)."""
    bg = smooth_image(h, w, noise=30)
    frames = []
    for i in range(t):
        f = bg.copy()
        if not static:
            x0 = 4 + i * 9
            f[10:30, x0:x0 + 20] = [250, 30, 30]
        frames.append(f)
    return np.stack(frames)


def write_lossless_video(path, frames, fps):
    """FFV1 (lossless) in Matroska, RGB planar: decodes bit-exactly with PyAV and GStreamer."""
    # bitexact: no random segment UID or encoder string, so regenerating gives identical bytes.
    with av.open(path, "w", format="matroska", options={"fflags": "+bitexact"}) as c:
        s = c.add_stream("ffv1", rate=fps, options={"flags": "+bitexact"})
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt = "bgr0"
        for f in frames:
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with av.open(path) as c:
        decoded = np.stack([fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)])
    assert decoded.shape == frames.shape and (decoded == frames).all(), "video is not lossless"


def main():
    os.makedirs(OUT, exist_ok=True)
    ck = {}
    for name, layout, pil in [("tf5", "tf5", False), ("legacy", "legacy", False), ("pil", "tf5", True)]:
        d = os.path.join(ROOT, f"ckpt_{name}")
        tiny_checkpoint.write_checkpoint(d, layout, pil=pil)
        ck[name] = AutoProcessor.from_pretrained(d)
    # transformers picks the torchvision backend by default; honour the checkpoint's PIL request
    # the same way a user would (explicit class), then check both are what we think.
    pil_cfg = json.load(open(os.path.join(ROOT, "ckpt_pil", "processor_config.json")))["image_processor"]
    ck["pil"].image_processor = VideoLlama3ImageProcessorPil(**{k: v for k, v in pil_cfg.items() if k != "image_processor_type"})
    assert type(ck["tf5"].image_processor).__name__ == "VideoLlama3ImageProcessor"

    expected = {"transformers": __import__("transformers").__version__, "torch": torch.__version__,
                "images": {}, "videos": {}, "sampling": {}, "conversations": {}, "tokenizer": {}}
    images = make_media()

    # ---- images: torchvision backend and PIL backend
    for key, im in images.items():
        if key == "bad_aspect":
            continue
        entry = {"file": f"media/{key}.png", "mode": im.mode, "size_hw": [im.height, im.width]}
        for backend, proc in [("torchvision", ck["tf5"].image_processor), ("pil", ck["pil"].image_processor)]:
            out = proc(images=[im], return_tensors="pt")
            entry[backend] = {
                "pixel_values": save_f32(f"img_{key}_{backend}.bin", out["pixel_values"]),
                "image_grid_thw": tolist(out["image_grid_thw"]),
                "image_merge_sizes": tolist(out["image_merge_sizes"]),
            }
        expected["images"][key] = entry

    # ---- videos from pre-sampled frames (uint8 .npy-free: raw RGB frames stored as PNGs)
    vp = ck["tf5"].video_processor
    clips = {"moving": (moving_clip(4, 72, 96), 2.0), "static": (moving_clip(4, 72, 96, static=True), 2.0),
             "odd": (moving_clip(3, 50, 70), 1.5)}
    for key, (frames, fps) in clips.items():
        paths = []
        for i, f in enumerate(frames):
            p = f"media/clip_{key}_{i}.png"
            Image.fromarray(f).save(os.path.join(ROOT, p))
            paths.append(p)
        md = {"total_num_frames": len(frames), "fps": fps, "frames_indices": list(range(len(frames)))}
        entry = {"frames": paths, "fps": fps}
        for comp in [True, False]:
            out = vp(videos=[frames], video_metadata=[md], use_token_compression=comp, return_tensors="pt")
            tag = "pruned" if comp else "unpruned"
            if comp:
                entry["pixel_values_videos"] = save_f32(f"vid_{key}.bin", out["pixel_values_videos"])
                entry["video_grid_thw"] = tolist(out["video_grid_thw"])
                entry["video_merge_sizes"] = tolist(out["video_merge_sizes"])
            entry[f"compression_mask_{tag}"] = [int(b) for b in out["video_compression_mask"].tolist()]
        expected["videos"][key] = entry

    # ---- frame sampling from a lossless file (transformers' sample_frames on the decoded frames)
    file_frames = moving_clip(12, 56, 84)
    write_lossless_video(os.path.join(MEDIA, "clip12.mkv"), file_frames, 6)
    md = {"total_num_frames": 12, "fps": 6.0, "duration": 2.0, "frames_indices": list(range(12))}
    for tag, kw in [("fps2", {"fps": 2}), ("fps1", {"fps": 1}), ("num5", {"num_frames": 5}), ("fps4", {"fps": 4})]:
        out = vp(videos=[file_frames], video_metadata=[dict(md)], do_sample_frames=True, return_tensors="pt", **kw)
        meta = out["video_metadata"][0]
        expected["sampling"][tag] = {
            "kwargs": kw, "indices": [int(i) for i in meta.frames_indices],
            "timestamps": [float(t) for t in meta.timestamps],
            "pixel_values_videos": save_f32(f"sample_{tag}.bin", out["pixel_values_videos"]),
            "video_grid_thw": tolist(out["video_grid_thw"]),
            "compression_mask": [int(b) for b in out["video_compression_mask"].tolist()],
        }
    expected["sampling_file"] = {"file": "media/clip12.mkv", "fps": 6.0, "total_num_frames": 12}

    # ---- compression mask with non-default threshold / min tokens (what `[pruning]` configures;
    # the processor call always uses 0.1 / 1, so call transformers' mask function directly)
    expected["pruning_params"] = []
    for clip in ["moving", "odd"]:
        frames, fps = clips[clip]
        clip_md = {"total_num_frames": len(frames), "fps": fps, "frames_indices": list(range(len(frames)))}
        out = vp(videos=[frames], video_metadata=[clip_md], return_tensors="pt")
        for thr in [0.0, 0.1, 5.0, 20.0, 60.0]:
            for mt in [0, 1, 2, 3]:
                m = vp._get_compression_mask(out["pixel_values_videos"], out["video_grid_thw"], out["video_merge_sizes"],
                                             threshold=thr, min_tokens=mt)
                expected["pruning_params"].append({"clip": clip, "threshold": thr, "min_tokens": mt,
                                                   "mask": [int(b) for b in m.tolist()]})

    # ---- chat templates rendered by transformers' jinja environment
    from transformers.utils.chat_template_utils import render_jinja_template
    tmpl_cases = [
        ("real", tiny_checkpoint.CHAT_TEMPLATE, {}, [
            [{"role": "user", "content": "plain string"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "  spaced  "}]}],
            [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q?"}]}, {"role": "assistant", "content": [{"type": "text", "text": "A."}]}],
            [{"role": "stream", "content": [{"type": "text", "text": "live"}]}, {"role": "user", "content": "go"}],
        ]),
        ("real_system", tiny_checkpoint.CHAT_TEMPLATE, {"add_system_prompt": True}, [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        ]),
        ("features", tiny_checkpoint.FEATURES_TEMPLATE, {"eos_token": "<|im_end|>", "tools": [
            {"type": "function", "function": {"name": "get_weather", "description": "Wetter für Köln \"heute\"",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                              "required": ["city"], "n": 3, "x": 1.5, "ok": True, "none": None}}}]}, [
            [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "日本語 <b>&amp;</b>"}, {"type": "image"}]},
             {"role": "assistant", "content": "Sure: \"quoted\"\nnext line"}] + [{"role": "user", "content": f"turn {i}"} for i in range(6)],
        ]),
    ]
    expected["templates"] = []
    for name, tmpl, kw, convs in tmpl_cases:
        for agp in [True, False]:
            rendered, _ = render_jinja_template(conversations=convs, chat_template=tmpl, add_generation_prompt=agp, **kw)
            expected["templates"].append({"name": name, "template": tmpl, "kwargs": kw, "conversations": convs,
                                          "add_generation_prompt": agp, "rendered": rendered})

    # ---- raw resize kernels at large scale factors. The input is a formula both sides compute, so
    # only the (small) outputs are stored, as PNG.
    import torchvision.transforms.v2.functional as tvF
    expected["resize"] = []
    for (h, w, oh, ow) in [(720, 1280, 42, 70), (480, 640, 97, 31), (1080, 1920, 64, 112), (37, 23, 180, 140),
                           (300, 8, 30, 101), (61, 83, 59, 85), (500, 40, 71, 13)]:
        arr = formula_image(h, w)
        tv = tvF.resize(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), [oh, ow],
                        interpolation=tvF.InterpolationMode.BICUBIC, antialias=True).permute(1, 2, 0).numpy()
        pil = np.array(Image.fromarray(arr).resize((ow, oh), Image.BICUBIC))
        names = {}
        for tag, out in [("torchvision", tv), ("pil", pil)]:
            name = f"resize_{h}x{w}_{oh}x{ow}_{tag}.png"
            Image.fromarray(np.ascontiguousarray(out)).save(os.path.join(OUT, name))
            names[tag] = name
        expected["resize"].append({"in_hw": [h, w], "out_hw": [oh, ow], **names})

    # ---- tokenizer
    tok = ck["tf5"].tokenizer
    for i, s in enumerate(tiny_checkpoint.CORPUS + ["<|im_start|>user\nhi<|im_end|>\n", "  spaces\n\n and\ttabs  "]):
        ids = tok(s, add_special_tokens=True)["input_ids"]
        expected["tokenizer"][str(i)] = {"text": s, "ids": ids,
                                         "decoded_skip": tok.decode(ids, skip_special_tokens=True)}

    # ---- conversations through the full processor, both layouts
    def img(k):
        return images[k]

    moving, mfps = clips["moving"]
    convs = {
        "text_only": ([[{"role": "user", "content": [{"type": "text", "text": "Describe this."}]}]], [], []),
        "string_content": ([[{"role": "system", "content": "You are a helpful assistant."},
                             {"role": "user", "content": "Is anyone at the door?"}]], [], []),
        "image": ([[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]], ["down"], []),
        "multi_image": ([[{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What is shown?"}]}]], ["odd", "gray"], []),
        "video": ([[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is shown in this video?"}]}]], [], ["moving"]),
        "multi_turn": ([[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this."}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "A gradient."}]},
                         {"role": "user", "content": [{"type": "text", "text": "Is there a person?"}]}]], ["up"], []),
        "batch_mixed": ([
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
            [{"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "What is shown in this video?"}]}],
            [{"role": "user", "content": [{"type": "text", "text": "Describe this."}]}],
        ], ["wide", "rgba"], ["static"]),
    }
    for layout in ["tf5", "legacy"]:
        proc = ck[layout]
        for name, (conv, ims, vids) in convs.items():
            for comp in [True, False] if vids else [True]:
                for side in ["left", "right"] if len(conv) > 1 else ["left"]:
                    texts = proc.apply_chat_template(conv, add_generation_prompt=True)
                    kw = dict(text=texts, padding=True, padding_side=side, return_tensors="pt")
                    if ims:
                        kw["images"] = [img(k) for k in ims]
                    if vids:
                        kw["videos"] = [clips[k][0] for k in vids]
                        kw["video_metadata"] = [{"total_num_frames": len(clips[k][0]), "fps": clips[k][1],
                                                 "frames_indices": list(range(len(clips[k][0])))} for k in vids]
                        kw["use_token_compression"] = comp
                    out = proc(**kw)
                    case = {
                        "conversations": conv, "images": ims, "videos": vids, "padding_side": side,
                        "use_token_compression": comp, "prompts": texts,
                        "input_ids": tolist(out["input_ids"]), "attention_mask": tolist(out["attention_mask"]),
                    }
                    if ims:
                        case["image_grid_thw"] = tolist(out["image_grid_thw"])
                        case["pixel_values_sum"] = float(out["pixel_values"].double().sum())
                        case["pixel_values_rows"] = int(out["pixel_values"].shape[0])
                    if vids:
                        case["video_grid_thw"] = tolist(out["video_grid_thw"])
                        case["video_compression_mask"] = [int(b) for b in out["video_compression_mask"].tolist()]
                        case["pixel_values_videos_sum"] = float(out["pixel_values_videos"].double().sum())
                    key = f"{layout}/{name}" + ("" if comp else "/nopruning") + (f"/{side}" if len(conv) > 1 else "")
                    expected["conversations"][key] = case

    # ---- what `vigil preprocess` must print for one invocation (media before the text, in order)
    proc = ck["tf5"]
    md = {"total_num_frames": 12, "fps": 6.0, "duration": 2.0, "frames_indices": list(range(12))}
    file_out = vp(videos=[file_frames], video_metadata=[dict(md)], do_sample_frames=True, fps=2, return_tensors="pt")
    sampled = file_frames[file_out["video_metadata"][0].frames_indices.numpy() if hasattr(file_out["video_metadata"][0].frames_indices, "numpy") else file_out["video_metadata"][0].frames_indices]
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Is anyone at the door?"}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    idx = [int(i) for i in file_out["video_metadata"][0].frames_indices]
    out = proc(text=[text], images=[images["down"]], videos=[sampled],
               video_metadata=[{"total_num_frames": 12, "fps": 6.0, "frames_indices": idx}], return_tensors="pt")
    mask = out["video_compression_mask"]
    all_pixels = out["pixel_values"].double().sum() + out["pixel_values_videos"].double().sum()
    expected["cli"] = {
        "args": ["--image", "media/down.png", "--video", "media/clip12.mkv", "--fps", "2", "--prompt", "Is anyone at the door?"],
        "input_ids": tolist(out["input_ids"][0]), "prompt_tokens": int(out["input_ids"].shape[1]),
        "image_grid_thw": tolist(out["image_grid_thw"]), "video_grid_thw": tolist(out["video_grid_thw"]),
        "video_tokens_total": int(mask.numel()), "video_tokens_kept": int(mask.sum()),
        "pixel_values_sum": float(all_pixels),
    }

    with open(os.path.join(ROOT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(ROOT) for fn in fns)
    print(f"wrote {ROOT}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
