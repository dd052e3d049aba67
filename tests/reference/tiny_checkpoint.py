"""Tiny VideoLLaMA3 checkpoint directories in the exact Hugging Face layouts (processor side).

The real Qwen2 tokenizer cannot be downloaded here, so a small byte-level BPE tokenizer is trained
with the `tokenizers` library using Qwen2's pre-tokenizer regex, byte-level decoder and special
tokens. A model generator can later add `config.json` + weights to the same directories.

Layouts written by `write_checkpoint`:
  * "tf5":    processor_config.json (nested image_processor / video_processor, size dicts),
              chat_template.jinja
  * "legacy": preprocessor_config.json + video_preprocessor_config.json (min_pixels / max_pixels),
              chat_template.json (and the same template in tokenizer_config.json)
"""
import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2 / Qwen2.5 special tokens, in their id order after the BPE vocab.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The chat template of the converted checkpoint lkhl/VideoLLaMA3-2B-Image-HF (the one transformers'
# integration tests use), chat_template.jinja on its main branch as mirrored at
# https://hf.898520.xyz/lkhl/VideoLLaMA3-2B-Image-HF/blob/main/chat_template.jinja — the checkpoint's
# own data, kept byte-for-byte so the Rust renderer is tested on the real thing (multi-line string
# literals, `set` inside loops, an optional system prompt, the 'stream' role).
CHAT_TEMPLATE = """{%- set identifier = 'im' %}
{% for message in messages %}
{% if add_system_prompt and loop.first and message['role'] != 'system' %}
{{- '<|im_start|>system
You are VideoLLaMA3 created by Alibaba DAMO Academy, a helpful assistant to help people understand images and videos.<|im_end|>
' -}}
{% endif %}
{% if message['role'] == 'stream' %}
{% set identifier = 'stream' %}
{% else %}
{% set identifier = 'im' %}
{% endif %}
{{- '<|' + identifier + '_start|>' + message['role'] + '
' -}}
{% if message['content'] is string %}
{{- message['content'] -}}
{% else %}
{% for content in message['content'] %}
{% if content['type'] == 'text' %}
{{- content['text'] -}}
{% elif content['type'] == 'image' %}
{{- '<|image_pad|>' + '
' -}}
{% elif content['type'] == 'video' %}
{{- '<|video_pad|>' + '
' -}}
{% endif %}
{% endfor %}
{% endif %}
{{- '<|' + identifier + '_end|>' -}}
{% if identifier != 'stream' %}
{{- '
' -}}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
{{- '<|im_start|>assistant
' -}}
{% endif %}
"""

# A template written for vigil's tests that exercises the jinja features HF templates rely on
# (namespace, loop controls, python string methods, tojson on nested data, raise_exception guard).
FEATURES_TEMPLATE = """{%- set ns = namespace(turns=0, images=0) -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}
{{- '[SYS] ' + m.content.strip() + '\n' -}}
{%- continue -%}
{%- endif -%}
{%- set ns.turns = ns.turns + 1 -%}
{{- loop.index ~ '/' ~ loop.length ~ ' ' ~ m.role | upper ~ ':' -}}
{%- if m.content is string -%}
{{- ' ' + m.content | tojson -}}
{%- else -%}
{%- for c in m.content -%}
{%- if c.type == 'text' %} {{ c.text | tojson }}{% elif c.type == 'image' %}{% set ns.images = ns.images + 1 %} <img{{ ns.images }}>{% endif -%}
{%- if loop.last %};{% endif -%}
{%- endfor -%}
{%- endif %}
{% if m.role.startswith('assi') %}[a]
{% endif -%}
{%- if loop.index >= 6 %}{% break %}{% endif -%}
{%- endfor -%}
{{- 'turns=' ~ ns.turns -}}
{%- if tools is defined and tools %} tools={{ tools | tojson }}{% endif %}
{%- if tools is defined and tools %} pretty={{ tools[0] | tojson(indent=2) }}{% endif %}
{%- if add_generation_prompt %}
<gen>{{ eos_token }}
{%- endif %}
"""

CORPUS = [
    "Describe the image.", "What is shown in this video?", "Is anyone at the door?",
    "Describe this.", "How many cars are parked in the driveway? Answer with a number.",
    "You are a helpful assistant.", "The quick brown fox jumps over the lazy dog 0123456789.",
    "Is there a person in the frame? Answer yes or no.", "Time 0.0s: something moved.",
    "¿Qué hay en la imagen? Ünïcödé tëxt, 日本語 and emoji 🙂.",
]

# Small processor settings so that fixtures stay tiny; patch size and merge sizes are the real ones.
IMAGE_SETTINGS = dict(patch_size=14, merge_size=1, temporal_patch_size=1, min_pixels=14 * 14 * 8, max_pixels=14 * 14 * 24)
VIDEO_SETTINGS = dict(patch_size=14, merge_size=2, temporal_patch_size=1, min_pixels=28 * 28 * 1,
                      max_pixels=28 * 28 * 4 * 4, min_frames=2, max_frames=8)
MEAN = [0.5, 0.5, 0.5]
STD = [0.5, 0.5, 0.5]


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def _tokenizer_config(tok: Tokenizer, chat_template: str | None) -> dict:
    added = {}
    for t in SPECIAL_TOKENS:
        added[str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
    cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return cfg


def image_processor_dict(layout: str, pil: bool = False, settings: dict | None = None) -> dict:
    s = {**IMAGE_SETTINGS, **(settings or {})}
    d = {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": MEAN, "image_std": STD, "resample": 3, "rescale_factor": 1 / 255,
        "patch_size": s["patch_size"], "merge_size": s["merge_size"],
        "temporal_patch_size": s["temporal_patch_size"],
        "image_processor_type": "VideoLlama3ImageProcessorPil" if pil else "VideoLlama3ImageProcessor",
    }
    if layout == "tf5":
        d["size"] = {"shortest_edge": s["min_pixels"], "longest_edge": s["max_pixels"]}
    else:
        d["min_pixels"] = s["min_pixels"]
        d["max_pixels"] = s["max_pixels"]
    return d


def video_processor_dict(layout: str, settings: dict | None = None) -> dict:
    s = {**VIDEO_SETTINGS, **(settings or {})}
    d = {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "do_sample_frames": False, "image_mean": MEAN, "image_std": STD, "resample": 3,
        "rescale_factor": 1 / 255, "patch_size": s["patch_size"], "merge_size": s["merge_size"],
        "temporal_patch_size": s["temporal_patch_size"], "min_frames": s["min_frames"],
        "max_frames": s["max_frames"], "use_token_compression": True, "return_metadata": True,
        "video_processor_type": "VideoLlama3VideoProcessor",
    }
    if layout == "tf5":
        d["size"] = {"shortest_edge": s["min_pixels"], "longest_edge": s["max_pixels"]}
    else:
        d["min_pixels"] = s["min_pixels"]
        d["max_pixels"] = s["max_pixels"]
    return d


def write_checkpoint(path: str, layout: str, pil: bool = False, image: dict | None = None,
                     video: dict | None = None) -> None:
    """Write tokenizer + processor files of a tiny checkpoint in `layout` ("tf5" or "legacy").

    `image` / `video` override entries of IMAGE_SETTINGS / VIDEO_SETTINGS (e.g. pixel budgets).
    """
    os.makedirs(path, exist_ok=True)
    tok = build_tokenizer()
    tok.save(os.path.join(path, "tokenizer.json"))
    if layout == "tf5":
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(_tokenizer_config(tok, None), f, indent=2)
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(CHAT_TEMPLATE)
        with open(os.path.join(path, "processor_config.json"), "w") as f:
            json.dump({
                "processor_class": "VideoLlama3Processor",
                "image_processor": image_processor_dict(layout, pil, image),
                "video_processor": video_processor_dict(layout, video),
            }, f, indent=2)
    elif layout == "legacy":
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(_tokenizer_config(tok, CHAT_TEMPLATE), f, indent=2)
        with open(os.path.join(path, "chat_template.json"), "w") as f:
            json.dump({"chat_template": CHAT_TEMPLATE}, f, indent=2)
        pre = image_processor_dict(layout, pil, image)
        pre["processor_class"] = "VideoLlama3Processor"
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(pre, f, indent=2)
        vid = video_processor_dict(layout, video)
        vid["processor_class"] = "VideoLlama3Processor"
        with open(os.path.join(path, "video_preprocessor_config.json"), "w") as f:
            json.dump(vid, f, indent=2)
    else:
        raise ValueError(layout)
