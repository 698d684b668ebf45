"""Model shapes without weights, for the benches: `--shape llama3-8b --load-format dummy`.

A shape is a Hugging Face `config.json`; `write_shape_dir` writes it alone into a directory, which
the engine loads with `load_format="dummy"` (random weights of the right shapes, as vLLM's). Such a
directory has no tokenizer, so an engine on it runs with `skip_tokenizer_init` (token ids in and
out, no text), and a cluster serving it takes token-id prompts only. `kvfleet bench engine` and
`kvfleet bench serve` (with `--compare` and `--tiers`) share these options through
`add_shape_arguments` / `resolve_model` / `engine_options`.
"""

from __future__ import annotations

import json
from pathlib import Path

LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    hidden_act="silu",
    rope_theta=500000.0,
    bos_token_id=128000,
    eos_token_id=128001,
    dtype="bfloat16",
    rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
)

SHAPES = {"llama3-8b": LLAMA3_8B}


def write_shape_dir(path: str | Path, shape: dict = LLAMA3_8B) -> Path:
    """A model directory holding only config.json: for `load_format="dummy"`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(shape, indent=1))
    return path


def add_shape_arguments(parser) -> None:
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), help="a model shape instead of a directory (with --load-format dummy)"
    )
    parser.add_argument(
        "--load-format",
        choices=["auto", "dummy"],
        default="auto",
        help="dummy: random weights of the model's shapes, no tokenizer (prompts and outputs are token ids)",
    )


def resolve_model(args, root: str | Path) -> str | None:
    """`args.model`, or with `--shape` a config-only directory of that shape written under `root`.
    A shape has no weights: it needs `--load-format dummy`."""
    if not getattr(args, "shape", None):
        return args.model
    if args.load_format != "dummy":
        raise SystemExit(f"--shape {args.shape} has no weights: add --load-format dummy")
    return str(write_shape_dir(Path(root) / f"{args.shape}-shape", SHAPES[args.shape]))


def engine_options(load_format: str) -> dict:
    """The EngineConfig fields `--load-format` sets: a dummy model has no tokenizer to load."""
    return {"load_format": load_format, "skip_tokenizer_init": load_format == "dummy"}
