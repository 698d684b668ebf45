"""`load_tokenizer`: the one way the engine, the draft workers and the ingress load a model's
tokenizer, from a Hugging Face directory or from a GGUF file's metadata (vocabulary, merges, special
tokens and chat template; transformers converts it)."""

from __future__ import annotations

from pathlib import Path

from workers.models.gguf_file import find_gguf


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    return AutoTokenizer.from_pretrained(str(path))
