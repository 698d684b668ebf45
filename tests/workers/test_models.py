"""Loading Hugging Face directories: every supported family, shards, rope scaling, sliding
window, dtypes and dummy weights, checked against `transformers` logits on the same weights."""

import itertools
import json

import pytest
import torch
import transformers

from cluster.demo.model import build_model_dir
from workers.kernels.ops import get_ops
from workers.layers.attention import AttentionMetadata
from workers.models.config import ModelConfig, UnsupportedModelError
from workers.models.loader import load_model


def our_logits(model_dir, prompt, dtype=torch.float32, page_size=4, chunks=(None,), kernels="torch"):
    """Logits of every prompt position, run through the paged path in the given chunks."""
    cfg = ModelConfig.from_dir(model_dir)
    model = load_model(model_dir, cfg, dtype, torch.device("cpu"), 1024, get_ops(kernels, torch.device("cpu")))
    pages = -(-len(prompt) // page_size)
    table = list(reversed(range(pages)))  # pages out of order, as in a real pool
    for attn in model.attention_layers():
        attn.k_cache = torch.zeros(pages, page_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
        attn.v_cache = torch.zeros_like(attn.k_cache)
    bounds = [0, *[c for c in chunks if c], len(prompt)]
    outs = []
    with torch.no_grad():
        for s, e in itertools.pairwise(bounds):
            slots = torch.tensor([table[p // page_size] * page_size + p % page_size for p in range(s, e)])
            meta = AttentionMetadata(
                slot_mapping=slots,
                block_tables=torch.tensor([table], dtype=torch.int32),
                seq_lens=torch.tensor([e], dtype=torch.int32),
                query_start_loc=torch.tensor([0, e - s], dtype=torch.int32),
                num_decodes=int(e - s == 1),
                max_query_len=e - s,
                num_splits=1,
            )
            hidden = model(torch.tensor(prompt[s:e]), torch.arange(s, e), meta)
            outs.append(model.compute_logits(hidden).float())
    return torch.cat(outs)


def hf_logits(model_dir, prompt, dtype=torch.float32):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()


PROMPT = [(i * 37 + 11) % 500 + 3 for i in range(40)]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_logits_match_transformers_for_every_family(tmp_path, tokenizer, arch):
    path = build_model_dir(tmp_path / arch, arch, tokenizer=tokenizer, seed=5)
    torch.testing.assert_close(our_logits(path, PROMPT, chunks=(7, 23)), hf_logits(path, PROMPT), atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, tokenizer):
    one = build_model_dir(tmp_path / "one", "llama", tokenizer=tokenizer, seed=6)
    many = build_model_dir(tmp_path / "many", "llama", tokenizer=tokenizer, seed=6, max_shard_size="100KB")
    assert len(list(many.glob("*.safetensors"))) > 1
    torch.testing.assert_close(our_logits(many, PROMPT), our_logits(one, PROMPT), atol=0, rtol=0)


def test_llama3_rope_scaling_matches_transformers(tmp_path, tokenizer):
    rope = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
        rope_theta=500000.0,
    )
    path = build_model_dir(
        tmp_path / "l3",
        "llama",
        tokenizer=tokenizer,
        seed=7,
        rope_parameters=rope,
        head_dim=32,
        num_attention_heads=2,
        max_position_embeddings=1024,
    )
    cfg = ModelConfig.from_dir(path)
    assert cfg.rope.kind == "llama3" and cfg.rope.theta == 500000.0
    prompt = [(i * 13 + 5) % 500 + 3 for i in range(200)]  # well past the original 64 positions
    torch.testing.assert_close(our_logits(path, prompt, chunks=(150,)), hf_logits(path, prompt), atol=1e-4, rtol=1e-4)


def test_legacy_rope_theta_and_rope_scaling_keys_are_read():
    cfg = ModelConfig.from_dict(
        dict(
            model_type="llama",
            vocab_size=10,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            rope_theta=12345.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        )
    )
    assert (cfg.rope.theta, cfg.rope.kind, cfg.rope.factor) == (12345.0, "llama3", 8.0)


def test_mistral_sliding_window_matches_transformers(tmp_path, tokenizer):
    path = build_model_dir(tmp_path / "sw", "mistral", tokenizer=tokenizer, seed=8, sliding_window=8)
    assert ModelConfig.from_dir(path).sliding_window == 8
    torch.testing.assert_close(our_logits(path, PROMPT, chunks=(5, 30)), hf_logits(path, PROMPT), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_close_to_transformers(tmp_path, tokenizer, dtype):
    path = build_model_dir(tmp_path / "half", "llama", tokenizer=tokenizer, seed=9, dtype=str(dtype).split(".")[1])
    ours, ref = our_logits(path, PROMPT, dtype=dtype), hf_logits(path, PROMPT, dtype=dtype)
    assert (ours - ref).abs().max() < 0.1 * ref.abs().max()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_dummy_weights_need_no_checkpoint(tmp_path, model_dirs):
    path = tmp_path / "cfg-only"
    path.mkdir()
    (path / "config.json").write_text((model_dirs["llama"] / "config.json").read_text())
    cfg = ModelConfig.from_dir(path)
    ops = get_ops("torch", torch.device("cpu"))
    model = load_model(path, cfg, torch.float32, torch.device("cpu"), 64, ops, load_format="dummy", seed=1)
    weights = dict(model.named_parameters())
    assert weights["model.norm.weight"].eq(1).all()
    assert 0 < weights["model.embed_tokens.weight"].abs().max() <= 1e-3


def test_parameters_are_made_in_the_model_dtype_and_rotary_tables_stay_float32(tmp_path, model_dirs):
    # made in float32 and cast, an 8B model passes through 32 GB while loading
    path = tmp_path / "cfg-only"
    path.mkdir()
    (path / "config.json").write_text((model_dirs["llama"] / "config.json").read_text())
    made = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.empty and isinstance(out, torch.Tensor):
                made.append(out.dtype)
            return out

    ops = get_ops("torch", torch.device("cpu"))
    with Watch():
        model = load_model(path, ModelConfig.from_dir(path), torch.bfloat16, torch.device("cpu"), 64, ops, "dummy")
    assert made and set(made) == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary.cos.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32


def test_unsupported_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match=r"gpt2.*llama"):
        ModelConfig.from_dir(tmp_path)


def test_missing_tensor_is_a_clear_error(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    path = build_model_dir(tmp_path / "cut", "llama", tokenizer=tokenizer, seed=10)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*qkv_proj"):
        load_model(path, ModelConfig.from_dir(path), torch.float32, torch.device("cpu"), 64, get_ops("torch", "cpu"))
