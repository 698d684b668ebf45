"""Build small Hugging Face model directories locally: a byte-level BPE tokenizer trained on
text every machine has (the Python standard library's sources) and a Llama-family decoder
with seeded random weights.

The demo uses it until a trained model pair ships; the tests use it to compare the engine
with `transformers` on the same weights. Nothing is downloaded.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

# Text with multi-byte characters, so that byte-level tokens split characters and the
# detokenizer is exercised on them.
_MULTILINGUAL = (
    "Pages of keys and values. Café, naïve, Zürich, señor. Сервер страниц. "
    "页面缓存与前缀。 ページのキャッシュ。 🚀🔥✨ ∑∫√π≈ — “quoted” ‘text’.\n"
)

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


def corpus_text(max_bytes: int = 200_000) -> str:
    """Deterministic training text: sorted stdlib sources up to `max_bytes`, plus multilingual lines."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [_MULTILINGUAL * 20], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        parts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return "".join(parts)[: max_bytes + len(parts[0])]


def train_tokenizer(vocab_size: int = 512, max_bytes: int = 60_000):
    """A byte-level BPE tokenizer trained on `corpus_text(max_bytes)` (see train_tokenizer_on)."""
    lines = corpus_text(max_bytes).splitlines(keepends=True)
    return train_tokenizer_on(["".join(lines[i : i + 50]) for i in range(0, len(lines), 50)], vocab_size)


def train_tokenizer_on(texts, vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts`, with specials <s> (0),
    </s> (1) and <pad> (2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", clean_up_tokenization_spaces=False
    )


def model_config(arch: str, vocab_size: int, **overrides):
    """A tiny `transformers` config of the given family; overrides win."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # The default 0.02 makes a tiny random model repeat one token forever; 0.2 gives
        # diverse greedy outputs, so that comparisons with transformers prove something.
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    if arch == "llama":
        cls = transformers.LlamaConfig
    elif arch == "mistral":
        cls = transformers.MistralConfig
        common.update(sliding_window=None)
    elif arch == "qwen2":
        cls = transformers.Qwen2Config
        common.update(tie_word_embeddings=True)
    elif arch == "qwen3":
        cls = transformers.Qwen3Config
        common.update(head_dim=32, tie_word_embeddings=True)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    common.update(overrides)
    return cls(**common)


def build_model_dir(
    out_dir: str | Path,
    arch: str = "llama",
    tokenizer=None,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    **overrides,
) -> Path:
    """Write a tokenizer and a random-weight model of `arch` to `out_dir`; return the path."""
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or train_tokenizer()
    config = model_config(arch, len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    (out / "kvfleet-demo.json").write_text(json.dumps({"arch": arch, "seed": seed, "random_weights": True}))
    return out


# The trained pair that ships with kvfleet (cluster/demo/train.py made it; see each README.md).
DEMO_PAIR_DIR = Path(__file__).resolve().parent.parent / "demo_models"
DEMO_TARGET = "kvfleet-pycoder"
DEMO_DRAFT = "kvfleet-pycoder-draft"


def shipped_demo_pair() -> tuple[Path, Path]:
    """The shipped (target, draft) model directories: absolute paths inside the installed package."""
    return DEMO_PAIR_DIR / DEMO_TARGET, DEMO_PAIR_DIR / DEMO_DRAFT
