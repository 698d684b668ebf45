"""The GGUF reader (workers/models/gguf.py): our dequantizers against the `gguf` package's, the
config from metadata, clear errors for what we do not read, and the default model end to end:
greedy tokens and log-probabilities equal to transformers on the same GGUF (float32), for chat
prompts run concurrently, under prefix caching, chunked prefill, preemption and speculation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from cluster.default_model import DRAFT_DIR
from workers.models import gguf as ours
from workers.models.config import ModelConfig, UnsupportedModelError
from workers.models.tokenizer import load_tokenizer
from workers.request import GenerateRequest, SamplingParams

NUM_NEW = 64
QUESTIONS = [
    "Why is the sky blue?",
    "Write a haiku about autumn.",
    "What is the capital of France?",
    "Give me three tips for learning to cook.",
    "Explain what a hash table is in one paragraph.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
]


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "F32"])
def test_dequantize_matches_the_gguf_package(type_name):
    qtype = GGMLQuantizationType[type_name]
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((48, 96)) * rng.uniform(0.01, 3.0, (48, 1))).astype(np.float32)
    packed = quants.quantize(values, qtype)
    got = ours.dequantize(packed, type_name, values.shape)
    want = quants.dequantize(packed, qtype)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want.reshape(values.shape))
    if type_name in ("F32", "F16", "BF16"):
        return
    assert np.abs(got - values).max() > 0  # really quantized, not a copy


def test_shipped_file_dequantizes_exactly_as_the_gguf_package(smollm2_gguf):
    reader = GGUFReader(str(smollm2_gguf))
    seen = set()
    for t in reader.tensors:
        if t.tensor_type.name in seen:
            continue
        seen.add(t.tensor_type.name)
        shape = tuple(int(n) for n in reversed(t.shape))
        want = quants.dequantize(t.data, t.tensor_type).reshape(shape)
        np.testing.assert_array_equal(ours.dequantize(t.data, t.tensor_type.name, shape), want)
    assert seen == {"Q8_0", "Q4_1", "F32"}


def test_config_from_metadata(smollm2_gguf):
    cfg = ModelConfig.from_dir(smollm2_gguf)
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert (cfg.vocab_size, cfg.head_dim, cfg.intermediate_size) == (49152, 64, 1536)
    assert cfg.tie_word_embeddings and cfg.rope.theta == 100000.0 and cfg.eos_token_ids == (2,)
    assert ModelConfig.from_dir(smollm2_gguf.parent) == cfg  # a directory holding one GGUF


def test_tokenizer_and_chat_template_from_the_file(smollm2_gguf):
    tok = load_tokenizer(smollm2_gguf)
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def _write_gguf(path, arch="llama", tensor_type=GGMLQuantizationType.F32, name="token_embd.weight"):
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_context_length(128)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(64)
    values = np.ones((64, 32), dtype=np.float32)
    if tensor_type != GGMLQuantizationType.F32:
        w.add_tensor(name, quants.quantize(values, tensor_type), raw_dtype=tensor_type)
    else:
        w.add_tensor(name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture_is_named(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", arch="gpt2")
    with pytest.raises(UnsupportedModelError, match="architecture 'gpt2'"):
        ModelConfig.from_dir(path)


def test_unsupported_tensor_type_is_named_before_any_is_read(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", tensor_type=GGMLQuantizationType.Q5_0)
    cfg = ModelConfig.from_dir(path)
    with pytest.raises(UnsupportedModelError, match=r"token_embd\.weight has GGUF type Q5_0"):
        next(ours.iter_gguf_weights(path, cfg))
    path = _write_gguf(tmp_path / "n.gguf", name="blk.0.attn_qkv.weight")
    with pytest.raises(UnsupportedModelError, match="attn_qkv"):
        next(ours.iter_gguf_weights(path, cfg))


def test_q_and_k_are_unpermuted_to_the_transformers_layout(smollm2_gguf, smollm2_hf):
    cfg = ModelConfig.from_dir(smollm2_gguf)
    hf = smollm2_hf.state_dict()
    for name, w in ours.iter_gguf_weights(smollm2_gguf, cfg):
        if name.startswith("model.layers.0.") or not name.startswith("model.layers."):
            torch.testing.assert_close(w, hf[name], rtol=0, atol=0, msg=name)


# ---- the default model, end to end --------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_prompts(smollm2_gguf):
    tok = load_tokenizer(smollm2_gguf)
    out = []
    for q in QUESTIONS:
        text = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        out.append(tok.encode(text, add_special_tokens=False))
    return out


def hf_greedy_check(model, prompt: list[int], output: list[int]) -> tuple[list[int], list[float]]:
    """transformers' greedy choice and the log-probability of `output`'s token at each generated
    position, from one forward over prompt + output. Where every choice equals `output`'s token,
    `output` is exactly what transformers' greedy decoding without a KV cache produces (by induction
    over the positions), at the cost of one forward instead of one per token. Without the cache the
    float32 rounding of a step does not depend on how earlier steps were computed; transformers' own
    cached and uncached greedy outputs differ at a near-tie (a gap of ~1e-5) on one of these prompts."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, -1)
    chosen = logprobs[torch.arange(len(output)), torch.tensor(output)]
    return logprobs.argmax(-1).tolist(), chosen.tolist()


@pytest.fixture(scope="module")
def gguf_engines(smollm2_gguf):
    from workers.config import EngineConfig
    from workers.engine import Engine

    engines = []

    def make(**overrides):
        kwargs = {"device": "cpu", "page_size": 16, "num_pages": 160, "max_model_len": 256, **overrides}
        engine = Engine(EngineConfig(model=str(smollm2_gguf), **kwargs))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine._executor.shutdown(wait=True)
        assert engine.pool.num_free_pages == engine.pool.num_pages, "pages leaked"


@pytest.mark.parametrize(
    "setting",
    [
        dict(),
        # small prefill chunks, a pool small enough to preempt, and speculation by the shipped draft, at once
        dict(
            max_num_batched_tokens=48,
            num_pages=40,
            max_model_len=160,
            speculative={
                "method": "draft",
                "draft_model": str(DRAFT_DIR),
                "num_speculative_tokens": 4,
                "adaptive": False,
            },
        ),
    ],
    ids=["prefix-cache", "chunked-preempted-speculative"],
)
@pytest.mark.timeout(900)  # 8 x 64 tokens of a 135M model: ~20 s on a quiet 2-core CPU, minutes on a loaded one
async def test_greedy_tokens_and_logprobs_equal_transformers(gguf_engines, smollm2_hf, chat_prompts, setting):
    engine = gguf_engines(**setting)
    # A sequence that asks for logprobs decodes without speculation (one position per step), so the
    # speculative run compares tokens; the others compare log-probabilities too.
    speculative = "speculative" in setting
    params = SamplingParams(max_tokens=NUM_NEW, ignore_eos=True, logprobs=None if speculative else 0)
    outs = await asyncio.gather(*(engine.complete(GenerateRequest(p, params)) for p in chat_prompts))
    for prompt, out in zip(chat_prompts, outs, strict=True):
        assert len(out.token_ids) == NUM_NEW
        hf_choices, hf_logprobs = hf_greedy_check(smollm2_hf, prompt, out.token_ids)
        assert out.token_ids == hf_choices
        if not speculative:
            got = [step.chosen.logprob for step in out.logprobs]
            np.testing.assert_allclose(got, hf_logprobs, rtol=0, atol=1e-4)
    answer = engine.tokenizer.decode(outs[0].token_ids, skip_special_tokens=True)
    assert "rayleigh scattering" in answer.lower(), answer  # real English, not a vacuous comparison
    stats = engine.stats()
    if "num_pages" in setting:
        assert stats.num_preemptions > 0
    if not setting:  # (the small pool of the other setting may have evicted them)
        # a prompt sent again finds its full pages cached (and the same greedy token)
        again = await engine.complete(GenerateRequest(chat_prompts[0], SamplingParams(max_tokens=1, ignore_eos=True)))
        assert again.token_ids == outs[0].token_ids[:1]
        assert engine.stats().prefix_cache_hits - stats.prefix_cache_hits >= (len(chat_prompts[0]) - 1) // 16 * 16
    if "max_num_batched_tokens" in setting:
        assert stats.num_prefill_tokens >= sum(map(len, chat_prompts)) - stats.prefix_cache_hits
    if "speculative" in setting:
        assert stats.spec_accepted_tokens > 0


def test_shipped_draft_is_a_small_gguf_the_engine_reads(smollm2_gguf):
    (path,) = DRAFT_DIR.glob("*.gguf")
    assert path.stat().st_size < 20e6
    draft, target = ModelConfig.from_dir(DRAFT_DIR), ModelConfig.from_dir(smollm2_gguf)
    assert draft.vocab_size == target.vocab_size and draft.num_layers < target.num_layers
    assert {t.tensor_type.name for t in GGUFReader(str(path)).tensors} == {"Q8_0", "F32"}
