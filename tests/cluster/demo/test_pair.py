"""The shipped demo pair (cluster/demo_models): transformers loads it, the cards' numbers hold up,
the target writes Python, and kvfleet's engine decodes it exactly as transformers does."""

import ast
import copy
import json
import re

import pytest
import torch
import transformers

from cluster.demo.model import shipped_demo_pair
from cluster.demo.train import EOS_ID, SAMPLE_PROMPT, VOCAB_SIZE
from workers.config import EngineConfig
from workers.engine import Engine
from workers.request import GenerateRequest, SamplingParams

TARGET_DIR, DRAFT_DIR = shipped_demo_pair()


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TARGET_DIR)


@pytest.fixture(scope="module")
def target():
    return transformers.AutoModelForCausalLM.from_pretrained(TARGET_DIR, dtype=torch.float32).eval()


NUM_NEW = 48


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer.encode(SAMPLE_PROMPT)


@pytest.fixture(scope="module")
def hf_greedy(target, prompt_ids):
    """The target's greedy continuation of the sample prompt, by transformers (float32, CPU)."""
    config = copy.deepcopy(target.generation_config)
    config.eos_token_id = None  # a fixed length, as the engine's ignore_eos
    with torch.no_grad():
        out = target.generate(
            torch.tensor([prompt_ids]), generation_config=config, max_new_tokens=NUM_NEW, do_sample=False
        )
    return out[0, len(prompt_ids) :].tolist()


def _card_losses(path) -> dict[str, float]:
    card = (path / "README.md").read_text()
    rows = dict(
        re.findall(r"^\| (kvfleet-pycoder \(target\)|kvfleet-pycoder-draft|unigram[^|]*) \| ([\d.]+) \|$", card, re.M)
    )
    agreement = re.search(r"equals the target's at ([\d.]+)%", card)
    return {
        "target": float(rows["kvfleet-pycoder (target)"]),
        "draft": float(rows["kvfleet-pycoder-draft"]),
        "unigram": float(next(v for k, v in rows.items() if k.startswith("unigram"))),
        "agreement": float(agreement.group(1)) / 100,
    }


def test_transformers_loads_both_shipped_models_in_bfloat16():
    sizes = {}
    for path in (TARGET_DIR, DRAFT_DIR):
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        assert model.config.model_type == "llama" and model.config.vocab_size == VOCAB_SIZE
        assert model.dtype == torch.bfloat16
        sizes[path.name] = sum(p.numel() for p in model.parameters())
        assert (path / "tokenizer.json").is_file() and (path / "README.md").is_file()
    assert 15e6 < sizes[TARGET_DIR.name] < 25e6 and 2e6 < sizes[DRAFT_DIR.name] < 4e6
    on_disk = sum(f.stat().st_size for d in (TARGET_DIR, DRAFT_DIR) for f in d.iterdir())
    assert on_disk < 50e6


def test_cards_report_target_below_draft_below_unigram_and_agreement_above_half():
    for path in (TARGET_DIR, DRAFT_DIR):
        card = _card_losses(path)
        assert card["target"] < card["draft"] < card["unigram"]
        assert card["agreement"] > 0.5
        results = json.loads((path / "training.json").read_text())["results"]
        assert round(results["target_val_loss"], 3) == card["target"]
        assert round(results["draft_val_loss"], 3) == card["draft"]


def test_tokenizer_starts_each_prompt_with_the_file_separator(tokenizer):
    ids = tokenizer.encode(SAMPLE_PROMPT)
    assert ids[0] == EOS_ID and ids[1:] == tokenizer.encode(SAMPLE_PROMPT, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == SAMPLE_PROMPT


def test_target_greedy_fibonacci_is_python_with_a_return(tokenizer, hf_greedy):
    new = hf_greedy[: hf_greedy.index(EOS_ID)] if EOS_ID in hf_greedy else hf_greedy  # the file's end
    text = SAMPLE_PROMPT + tokenizer.decode(new)
    # Cut where the function ends (the next line at column 0), or else before the last line,
    # which the token limit may have cut short.
    lines = text.split("\n")
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() and not line[0].isspace()), len(lines) - 1)
    source = "\n".join(lines[:end])
    tree = ast.parse(source)
    func = tree.body[0]
    assert isinstance(func, ast.FunctionDef) and func.name == "fibonacci", source
    assert any(isinstance(node, ast.Return) for node in ast.walk(func)), source


async def test_engine_greedy_tokens_equal_transformers_on_the_target(prompt_ids, hf_greedy):
    engine = Engine(EngineConfig(model=str(TARGET_DIR), device="cpu", page_size=16, num_pages=16, max_model_len=128))
    try:
        got = await engine.complete(GenerateRequest(prompt_ids, SamplingParams(max_tokens=NUM_NEW, ignore_eos=True)))
    finally:
        await engine.shutdown()
    assert got.token_ids == hf_greedy
    assert engine.pool.num_free_pages == engine.pool.num_pages
