"""Writes tests/fixtures/engine/ckpt/: one complete tiny VideoLLaMA3 checkpoint for the engine tests.

Run from the repository root:  /work/pyref/bin/python tests/reference/gen_engine_checkpoint.py

Processor side from tiny_checkpoint.write_checkpoint("tf5") (Qwen2-style BPE tokenizer, the real
chat template, patch 14 / merge 2 video settings); model side from tiny_model with
spec_for_tokenizer (vocabulary, placeholder, EOS and pad ids are the tokenizer's) and the vision
patch size set to the processor's 14. The engine tests compare the engine against the same
checkpoint run one request at a time in Rust, so no transformers outputs are stored here.
"""

from __future__ import annotations

import os
import shutil
import sys

from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_checkpoint  # noqa: E402
import tiny_model  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "engine", "ckpt")


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    tiny_checkpoint.write_checkpoint(OUT, "tf5")
    tok = AutoTokenizer.from_pretrained(OUT)
    spec = tiny_model.spec_for_tokenizer(tok, name="engine", base="tiny_a", patch_size=14, seed=7)
    tiny_model.make_checkpoint(spec, OUT)
    print("wrote", OUT, sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
