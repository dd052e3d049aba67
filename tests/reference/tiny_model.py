"""Tiny random VideoLLaMA3 checkpoints in the exact Hugging Face layout.

`make_checkpoint` writes the model side alone (config, generation config, safetensors; used by
gen_model.py). `build_checkpoint` writes a complete checkpoint from a `CheckpointSpec`: the
tokenizer / processor / chat-template files of tiny_checkpoint plus weights sized to that
tokenizer; `CHECKPOINTS` holds the specs of every complete tiny checkpoint in the repository
(built by make_checkpoints.py). Source of truth: transformers 5.24
`models/video_llama_3/{configuration,modeling}_video_llama_3.py` and `models/qwen2`.

Random init (std 0.02) gives near-uniform logits whose top-1/top-2 gap is round-off sized, which
turns greedy comparisons into coin flips; `widen_weights` redraws everything with std ~0.15.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, GenerationConfig, VideoLlama3Config, VideoLlama3ForConditionalGeneration

import tiny_checkpoint


@dataclass
class TinySpec:
    """Shape knobs of a tiny checkpoint."""

    name: str
    vocab_size: int = 512
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_hidden_layers: int = 2
    intermediate_size: int = 128
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    vision_hidden_size: int = 32
    vision_heads: int = 2
    vision_layers: int = 2
    vision_intermediate_size: int = 64
    patch_size: int = 4
    # None = leave the vision rope theta out of config.json (loader must default to 10000).
    vision_rope_theta: float | None = 10000.0
    image_token_id: int = 500
    video_token_id: int = 501
    eos_token_ids: list[int] = field(default_factory=lambda: [2])
    pad_token_id: int = 0
    # Where tie_word_embeddings is written: "text" (text_config only), "top" or "none" (untied).
    tie: str = "none"
    # "v5" writes rope_parameters dicts; "legacy" writes a top-level text `rope_theta`.
    layout: str = "v5"
    # Shard size for save_pretrained; None = single model.safetensors.
    max_shard_size: str | None = None
    std: float = 0.15
    seed: int = 0


def build_config(spec: TinySpec) -> VideoLlama3Config:
    tied = spec.tie != "none"
    vision = dict(
        hidden_size=spec.vision_hidden_size,
        num_attention_heads=spec.vision_heads,
        num_hidden_layers=spec.vision_layers,
        intermediate_size=spec.vision_intermediate_size,
        patch_size=spec.patch_size,
    )
    if spec.vision_rope_theta is not None:
        vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": spec.vision_rope_theta}
    return VideoLlama3Config(
        text_config=dict(
            model_type="qwen2",
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            num_hidden_layers=spec.num_hidden_layers,
            intermediate_size=spec.intermediate_size,
            rms_norm_eps=spec.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
            tie_word_embeddings=tied,
            eos_token_id=spec.eos_token_ids[0],
            pad_token_id=spec.pad_token_id,
        ),
        vision_config=vision,
        image_token_id=spec.image_token_id,
        video_token_id=spec.video_token_id,
        tie_word_embeddings=tied,
    )


@torch.no_grad()
def widen_weights(model: torch.nn.Module, std: float, seed: int) -> None:
    """Redraw every parameter: matrices ~N(0, std), norm weights ~1+N(0, std/3), biases ~N(0, std/3)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + noise * std / 3)
        elif name.endswith("bias"):
            p.copy_(noise * std / 3)
        elif "embed_tokens" in name or "lm_head" in name:
            # Larger vocabulary projections spread the logits so greedy winners are clear.
            p.copy_(noise * std * 3)
        else:
            p.copy_(noise * std)


def build_model(spec: TinySpec) -> VideoLlama3ForConditionalGeneration:
    torch.manual_seed(spec.seed)
    config = build_config(spec)
    model = VideoLlama3ForConditionalGeneration(config).eval().to(torch.float32)
    widen_weights(model, spec.std, spec.seed)
    if spec.tie != "none":
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    return model


def _rewrite_config(path: str, spec: TinySpec) -> None:
    """Apply the layout variations real checkpoints show (see TinySpec.tie / layout)."""
    with open(path) as f:
        cfg = json.load(f)
    text = cfg["text_config"]
    if spec.tie == "text":
        cfg.pop("tie_word_embeddings", None)
        text["tie_word_embeddings"] = True
    elif spec.tie == "top":
        cfg["tie_word_embeddings"] = True
        text.pop("tie_word_embeddings", None)
    if spec.layout == "legacy":
        theta = text.pop("rope_parameters")["rope_theta"]
        text["rope_theta"] = theta
        text.pop("layer_types", None)
    if spec.vision_rope_theta is None:
        cfg["vision_config"].pop("rope_parameters", None)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def save_checkpoint(model: VideoLlama3ForConditionalGeneration, spec: TinySpec, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    kwargs = {}
    if spec.max_shard_size is not None:
        kwargs["max_shard_size"] = spec.max_shard_size
    model.save_pretrained(out_dir, **kwargs)
    _rewrite_config(os.path.join(out_dir, "config.json"), spec)
    gen = GenerationConfig(
        eos_token_id=list(spec.eos_token_ids),
        pad_token_id=spec.pad_token_id,
        do_sample=False,
    )
    gen.save_pretrained(out_dir)


def load_checkpoint(out_dir: str) -> VideoLlama3ForConditionalGeneration:
    """Reload through transformers so fixtures come from what it actually reads from disk."""
    model = VideoLlama3ForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32)
    return model.eval()


def make_checkpoint(spec: TinySpec, out_dir: str) -> VideoLlama3ForConditionalGeneration:
    model = build_model(spec)
    save_checkpoint(model, spec, out_dir)
    return load_checkpoint(out_dir)


SPECS = {
    # Tied embeddings (declared in text_config only), transformers-5 rope_parameters layout,
    # GQA 2, single model.safetensors, explicit vision rope theta.
    "tiny_a": TinySpec(
        name="tiny_a",
        tie="text",
        layout="v5",
        vision_rope_theta=500.0,
        rope_theta=1e6,
        eos_token_ids=[2],
    ),
    # Untied, legacy top-level rope_theta, GQA 3, sharded safetensors, vision rope theta absent
    # (default 10000), different patch size and widths.
    "tiny_b": TinySpec(
        name="tiny_b",
        vocab_size=576,
        hidden_size=96,
        num_attention_heads=6,
        num_key_value_heads=2,
        num_hidden_layers=3,
        intermediate_size=160,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        vision_hidden_size=48,
        vision_heads=4,
        vision_layers=2,
        vision_intermediate_size=96,
        patch_size=6,
        vision_rope_theta=None,
        image_token_id=570,
        video_token_id=571,
        eos_token_ids=[3, 575],
        tie="none",
        layout="legacy",
        max_shard_size="300KB",
        seed=1,
    ),
}


def spec_copy(base: str, **overrides) -> TinySpec:
    spec = copy.deepcopy(SPECS[base])
    for k, v in overrides.items():
        setattr(spec, k, v)
    return spec


def spec_for_tokenizer(tokenizer, name: str = "demo", base: str = "tiny_a", **overrides) -> TinySpec:
    """A tiny spec whose vocabulary and special ids match `tokenizer` (e.g. the processor's Qwen2
    tokenizer), so the checkpoint can be driven end to end with real prompts.

    Image/video placeholder ids follow `VideoLlama3Processor` (`<|image_pad|>`, `<|video_pad|>`);
    EOS is the tokenizer's eos token (`<|im_end|>` for Qwen2 chat), pad its pad token.
    """
    def token_id(tok: str) -> int:
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {tok!r} token")
        return int(i)

    spec = spec_copy(base, name=name)
    spec.vocab_size = len(tokenizer)
    spec.image_token_id = token_id(getattr(tokenizer, "image_token", None) or "<|image_pad|>")
    spec.video_token_id = token_id(getattr(tokenizer, "video_token", None) or "<|video_pad|>")
    eos = tokenizer.eos_token_id
    spec.eos_token_ids = [int(eos)] if eos is not None else []
    pad = tokenizer.pad_token_id
    spec.pad_token_id = int(pad) if pad is not None else (spec.eos_token_ids or [0])[0]
    for k, v in overrides.items():
        setattr(spec, k, v)
    return spec


@dataclass(frozen=True)
class CheckpointSpec:
    """A complete tiny checkpoint: processor files in `layout` ("tf5" or "legacy", see
    tiny_checkpoint) and the weights of SPECS[base] drawn with `seed`, sized to the tokenizer."""

    layout: str
    base: str
    seed: int
    # TinySpec overrides (widths, init std).
    model: dict = field(default_factory=dict)
    # tiny_checkpoint IMAGE_SETTINGS / VIDEO_SETTINGS overrides (pixel budgets, max_frames).
    image: dict = field(default_factory=dict)
    video: dict = field(default_factory=dict)


# 224 x 224 px: 64 video tokens per frame of a 4-frame demo window.
DEMO_FRAME_PIXELS = 224 * 224

CHECKPOINTS = {
    # tests/fixtures/engine/ckpt
    "engine": CheckpointSpec(layout="tf5", base="tiny_a", seed=7),
    # tests/fixtures/infer/ckpt_{tf5,legacy}; the seeds are starting points that
    # make_checkpoints.py steps by 100 until greedy decoding has clear winners.
    "infer_tf5": CheckpointSpec(layout="tf5", base="tiny_a", seed=20),
    "infer_legacy": CheckpointSpec(layout="legacy", base="tiny_b", seed=21),
    # models/tiny-videollama3 before training (train_demo_model.py). Images up to 224 x 224 px; a
    # video window shares 4 x 224 x 224 px among its frames (transformers divides longest_edge by
    # the frame count), so it costs about the same at 2 or 8 frames.
    "demo": CheckpointSpec(
        layout="tf5", base="tiny_a", seed=7,
        model=dict(std=0.02, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                   num_key_value_heads=2, num_hidden_layers=2, vision_hidden_size=64,
                   vision_heads=2, vision_layers=2, vision_intermediate_size=128),
        image=dict(max_pixels=DEMO_FRAME_PIXELS),
        video=dict(max_pixels=DEMO_FRAME_PIXELS * 4, max_frames=32),
    ),
}


def build_checkpoint(spec: CheckpointSpec, out_dir: str) -> tuple[TinySpec, VideoLlama3ForConditionalGeneration]:
    """Write the complete checkpoint `spec` to `out_dir` (replacing it).

    Returns the model spec and the model as built in memory (not reloaded), so a caller can train
    it further; reload with `load_checkpoint` to see what transformers reads from disk.
    """
    shutil.rmtree(out_dir, ignore_errors=True)
    tiny_checkpoint.write_checkpoint(out_dir, spec.layout, image=spec.image, video=spec.video)
    tok = AutoTokenizer.from_pretrained(out_dir)
    # The vision patch is the processor's, or the pixel values would not fit the patch embedding.
    patch = {**tiny_checkpoint.IMAGE_SETTINGS, **spec.image}["patch_size"]
    model_spec = spec_for_tokenizer(tok, name=os.path.basename(out_dir), base=spec.base, seed=spec.seed,
                                    patch_size=patch, **spec.model)
    model = build_model(model_spec)
    save_checkpoint(model, model_spec, out_dir)
    return model_spec, model
