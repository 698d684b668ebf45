"""The sampler alone, on CPU with a small vocabulary.

Each processor is checked against its Hugging Face counterpart on the same input. Which tokens a
filter allows cannot be read off one sampled token, so those tests call the sampler's `_filter`
and `_penalize` directly; the public path is checked to stay inside the same sets. Statistical
tests use a seeded sampler, so they are deterministic, and tolerances of over 5 sigma.
"""

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from workers.request import SamplingParams
from workers.sampling import Sampler, SamplingInputs, make_generator

V = 32
NO_IDS = torch.empty(1, 0, dtype=torch.long)  # HF warpers take input_ids but ignore them


def sample(sampler, logits, params, generators=None, history=None):
    rows = len(params)
    return sampler(
        logits,
        SamplingInputs(params, generators or [None] * rows, history or [[] for _ in range(rows)]),
    )


def logit_rows(seed: int) -> torch.Tensor:
    """Random rows, rows with many exact ties (small integers), and a peaked row."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(4, V, generator=g) * 2
    tied = torch.randint(-2, 3, (4, V), generator=g).float()
    peaked = torch.randn(1, V, generator=g)
    peaked[0, 5] = 12.0
    return torch.cat([normal, tied, peaked])


def hf_allowed(row: torch.Tensor, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """The tokens HF leaves finite, with warpers added as `_get_logits_processor` adds them."""
    warpers = LogitsProcessorList()
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p > 0:
        warpers.append(MinPLogitsWarper(min_p))
    return warpers(NO_IDS, row.unsqueeze(0).clone())[0].isfinite()


def our_allowed(rows: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    return Sampler("cpu", seed=0)._filter(rows, params).isfinite()


def frequencies(tokens: list[int]) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=V).float() / len(tokens)


# ---------------------------------------------------------------- greedy


def test_all_greedy_batch_is_argmax_in_any_dtype_and_draws_no_noise():
    sampler = Sampler("cpu", seed=0)
    state = sampler.generator.get_state()
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(1)).bfloat16()
    out = sample(sampler, logits, [SamplingParams() for _ in range(6)])
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6
    assert torch.equal(sampler.generator.get_state(), state)


def test_greedy_row_takes_argmax_after_repetition_penalty_like_hf():
    logits = torch.tensor([[0.1, 2.0, 1.9, -1.0] + [-5.0] * (V - 4)])
    history = [[1, 3, 1]]
    hf = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor(history), logits.clone())
    out = sample(Sampler("cpu", seed=0), logits, [SamplingParams(repetition_penalty=1.5)], history=history)
    assert out.token_ids == [hf.argmax().item()] == [2]  # the penalty moved the argmax off token 1


def test_top_k_one_equals_greedy():
    logits = torch.randn(64, V, generator=torch.Generator().manual_seed(2))  # no ties
    out = sample(Sampler("cpu", seed=0), logits, [SamplingParams(temperature=1.3, top_k=1)] * 64)
    assert out.token_ids == logits.argmax(dim=-1).tolist()


# ---------------------------------------------------------------- processors vs HF


def test_repetition_penalty_equals_hf_processor_per_row():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=g) * 3
    logits[:, 0] = 0.0  # zero logits: HF divides them, which leaves them at zero
    # Repeats, an out-of-vocabulary id (V + 3), and enough ids that dividing by the penalty and
    # multiplying by its reciprocal would differ somewhere.
    histories = [[0, 1, 1, 2, 7, 7, 7, *range(10, V)], [5, 9, V + 3, *range(12, 28)], [4, 4, *range(V)], [1, 2]]
    penalties = [1.3, 0.7, 1.1, 1.0]
    params = [SamplingParams(repetition_penalty=p) for p in penalties]
    rows = [i for i, p in enumerate(penalties) if p != 1.0]

    ours = Sampler("cpu", seed=0)._penalize(logits.float(), rows, params, histories)

    for i, (p, history) in enumerate(zip(penalties, histories, strict=True)):
        hf = logits[i : i + 1].clone()
        if p != 1.0:  # older HF fails on out-of-vocabulary ids; 5.23 drops them, as we do
            in_vocab = [t for t in history if t < V]
            hf = RepetitionPenaltyLogitsProcessor(p)(torch.tensor([in_vocab]), hf)
        assert torch.equal(ours[i], hf[0]), f"row {i}"
    assert not torch.equal(ours, logits)


@pytest.mark.parametrize("top_k", [1, 2, 3, 7, V, V + 5])
def test_top_k_allows_the_tokens_hf_top_k_warper_leaves_finite(top_k):
    rows = logit_rows(seed=top_k)
    ours = our_allowed(rows, [SamplingParams(temperature=1.0, top_k=top_k)] * len(rows))
    for i, row in enumerate(rows):
        assert torch.equal(ours[i], hf_allowed(row, top_k=top_k)), f"row {i}"


def test_top_k_keeps_every_token_tied_with_the_kth_like_hf():
    row = torch.tensor([3.0, 2.0, 2.0, 1.0] + [0.0] * (V - 4))
    ours = our_allowed(row.unsqueeze(0), [SamplingParams(temperature=1.0, top_k=2)])[0]
    assert ours.nonzero().flatten().tolist() == [0, 1, 2]
    assert torch.equal(ours, hf_allowed(row, top_k=2))


@pytest.mark.parametrize("top_p", [1e-9, 0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
def test_top_p_allows_the_tokens_hf_top_p_warper_leaves_finite(top_p):
    rows = logit_rows(seed=int(top_p * 1000))
    ours = our_allowed(rows, [SamplingParams(temperature=1.0, top_p=top_p)] * len(rows))
    for i, row in enumerate(rows):
        assert torch.equal(ours[i], hf_allowed(row, top_p=top_p)), f"row {i}"


def test_top_p_near_zero_keeps_exactly_one_token_even_among_tied_maxima():
    row = torch.tensor([1.0, 4.0, 4.0, 4.0] + [0.0] * (V - 4))
    ours = our_allowed(row.unsqueeze(0), [SamplingParams(temperature=1.0, top_p=1e-9)])[0]
    assert ours.sum().item() == 1
    assert torch.equal(ours, hf_allowed(row, top_p=1e-9))


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_min_p_allows_the_tokens_hf_min_p_warper_leaves_finite(min_p):
    rows = logit_rows(seed=int(min_p * 100))
    ours = our_allowed(rows, [SamplingParams(temperature=1.0, min_p=min_p)] * len(rows))
    for i, row in enumerate(rows):
        assert torch.equal(ours[i], hf_allowed(row, min_p=min_p)), f"row {i}"


def test_filters_with_different_params_per_row_match_hf_chain_row_by_row():
    rows = logit_rows(seed=11)
    rows[0, 0] = -200.0  # probability 0 in float32: still allowed when no filter applies
    settings = [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.2), (8, 0.9, 0.05), (3, 0.5, 0.5)]
    settings = (settings * 2)[: len(rows)]
    params = [SamplingParams(temperature=1.0, top_k=k, top_p=p, min_p=m) for k, p, m in settings]
    ours = our_allowed(rows, params)
    for i, (k, p, m) in enumerate(settings):
        assert torch.equal(ours[i], hf_allowed(rows[i], top_k=k, top_p=p, min_p=m)), f"row {i}"
    assert ours[0].all()  # a row with every filter disabled loses nothing to its neighbours' filters


def test_sampled_tokens_stay_within_the_tokens_hf_allows():
    row = torch.randn(V, generator=torch.Generator().manual_seed(5)) * 2
    for k, p, m in [(6, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.15), (10, 0.8, 0.05)]:
        allowed = hf_allowed(row, top_k=k, top_p=p, min_p=m)
        params = SamplingParams(temperature=1.0, top_k=k, top_p=p, min_p=m)
        out = sample(Sampler("cpu", seed=k), row.expand(4000, V), [params] * 4000)
        seen = torch.tensor(out.token_ids).unique()
        assert allowed[seen].all()
        assert len(seen) > 1


# ---------------------------------------------------------------- draws


def test_unseeded_sampling_at_temperature_one_matches_softmax_frequencies():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0] + [-30.0] * (V - 5))
    n = 20000
    out = sample(Sampler("cpu", seed=0), logits.expand(n, V), [SamplingParams(temperature=1.0)] * n)
    # one frequency's sigma is at most sqrt(0.25 / n) = 0.0035
    assert (frequencies(out.token_ids) - logits.softmax(-1)).abs().max() < 0.02


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_sharpens_or_flattens_the_distribution_to_softmax_of_scaled_logits(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0] + [-30.0] * (V - 5))
    expected = (logits / temperature).softmax(-1)
    assert (expected - logits.softmax(-1)).abs().max() > 0.1  # the test could tell T from 1
    n = 20000
    out = sample(Sampler("cpu", seed=1), logits.expand(n, V), [SamplingParams(temperature=temperature)] * n)
    assert (frequencies(out.token_ids) - expected).abs().max() < 0.02


def seeded_run(seed: int, steps: int, batch: int, position: int) -> list[int]:
    """`steps` tokens of one seeded row placed at `position` among `batch` rows of other kinds."""
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
    others = [
        SamplingParams(),
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=0.7, min_p=0.1, seed=999),
        SamplingParams(temperature=1.2, logprobs=2),
    ]
    sampler = Sampler("cpu", seed=batch)  # the shared generator differs with each layout too
    target_gen = make_generator(seed, "cpu")
    other_gens = [None, None, make_generator(999, "cpu"), None]
    row_logits = torch.Generator().manual_seed(100)
    noise_logits = torch.Generator().manual_seed(200 + batch)
    tokens = []
    for _ in range(steps):
        logits = torch.randn(batch, V, generator=noise_logits)
        logits[position] = torch.randn(V, generator=row_logits) * 0.5  # flat: many tokens likely
        params, gens = [], []
        for r in range(batch):
            params.append(target if r == position else others[r % len(others)])
            gens.append(target_gen if r == position else other_gens[r % len(others)])
        tokens.append(sample(sampler, logits, params, gens).token_ids[position])
    return tokens


def test_seeded_row_gives_the_same_tokens_at_any_batch_position_and_size():
    alone = seeded_run(seed=7, steps=15, batch=1, position=0)
    assert len(set(alone)) > 3  # genuinely sampled, so a wrong noise source would show
    assert seeded_run(seed=7, steps=15, batch=5, position=3) == alone
    assert seeded_run(seed=7, steps=15, batch=8, position=6) == alone


def test_different_seeds_give_different_token_sequences():
    assert seeded_run(seed=1, steps=15, batch=1, position=0) != seeded_run(seed=2, steps=15, batch=1, position=0)


# ---------------------------------------------------------------- logprobs and mixed batches


def test_logprobs_are_log_softmax_of_raw_logits_with_sorted_top_n():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(8)) * 3
    ns = [0, 1, 5, 20]
    params = [SamplingParams(temperature=0.5, repetition_penalty=1.4, top_k=4, logprobs=n) for n in ns]
    out = sample(Sampler("cpu", seed=0), logits, params, history=[[0, 1, 2, 3]] * 4)
    raw = logits.log_softmax(-1)
    for i, n in enumerate(ns):
        lp = out.logprobs[i]
        assert lp.chosen.token_id == out.token_ids[i]
        assert lp.chosen.logprob == pytest.approx(raw[i, out.token_ids[i]].item(), abs=1e-6)
        assert len(lp.top) == n
        assert [t.token_id for t in lp.top] == raw[i].topk(n).indices.tolist()
        assert [t.logprob for t in lp.top] == pytest.approx(raw[i].topk(n).values.tolist(), abs=1e-6)
        assert all(a.logprob >= b.logprob for a, b in zip(lp.top, lp.top[1:], strict=False))


def test_mixed_batch_of_greedy_sampled_and_logprob_rows():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(9))
    before = logits.clone()
    params = [
        SamplingParams(),  # greedy
        SamplingParams(temperature=1.0, seed=5),  # seeded
        SamplingParams(logprobs=3),  # greedy with logprobs
        SamplingParams(temperature=0.8, top_k=1),  # sampled, but only one token allowed
        SamplingParams(temperature=1.0, top_p=0.9, logprobs=0),  # unseeded with logprobs
        SamplingParams(repetition_penalty=1.2),  # greedy with penalty
    ]
    gens = [None, make_generator(5, "cpu"), None, None, None, None]
    history = [[], [], [], [], [], [int(logits[5].argmax())]]
    out = sample(Sampler("cpu", seed=0), logits, params, gens, history)

    argmax = logits.argmax(-1).tolist()
    assert [out.token_ids[i] for i in (0, 2, 3)] == [argmax[i] for i in (0, 2, 3)]
    alone = sample(Sampler("cpu", seed=1), logits[1:2], [params[1]], [make_generator(5, "cpu")])
    assert out.token_ids[1] == alone.token_ids[0]
    penalized = RepetitionPenaltyLogitsProcessor(1.2)(torch.tensor(history[5:]), logits[5:].clone())
    assert out.token_ids[5] == penalized.argmax().item()
    assert [lp is not None for lp in out.logprobs] == [False, False, True, False, True, False]
    assert len(out.logprobs[2].top) == 3 and out.logprobs[4].top == ()
    assert torch.equal(logits, before)  # the caller's logits are left alone
