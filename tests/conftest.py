"""Fixtures shared by the whole suite: a tokenizer trained here and tiny random models.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on stdlib sources, and the
models are `transformers` configs with random weights written to a temporary directory.
"""

from __future__ import annotations

import pytest

from cluster.demo_model import build_model_dir, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """One tiny random model directory per architecture, float32, shared by the session."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": build_model_dir(root / "llama", "llama", tokenizer=tokenizer, seed=1),
        "qwen2": build_model_dir(root / "qwen2", "qwen2", tokenizer=tokenizer, seed=2),
        "qwen3": build_model_dir(root / "qwen3", "qwen3", tokenizer=tokenizer, seed=3),
    }
