"""Speculative decoding through the engine's public API: greedy output identical to decoding
without it (every proposer, stop strings and max_tokens inside a proposal), sampling that draws
from the target's distribution (chi-square, fixed seeds), no page leaks in either pool, and a
failing proposer that costs the user nothing."""

import asyncio
import random

import pytest
import torch

from cluster.demo.model import shipped_demo_pair
from workers.config import SpeculativeConfig
from workers.request import FinishReason, GenerateRequest, SamplingParams
from workers.spec.decoder import SpeculativeDecoder, expected_tokens
from workers.spec.proposers import NgramProposer, Proposals

TARGET, DRAFT = (str(p) for p in shipped_demo_pair())
PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "for i in range(10):\n    print(",
]


def chi_square_p_value(table: list[list[int]]) -> float:
    """Pearson's test that the rows of a contingency table come from one distribution."""
    rows, cols = [sum(r) for r in table], [sum(c) for c in zip(*table, strict=True)]
    total = sum(rows)
    stat = sum(
        (table[i][j] - rows[i] * cols[j] / total) ** 2 / (rows[i] * cols[j] / total)
        for i in range(len(rows))
        for j in range(len(cols))
    )
    df = (len(rows) - 1) * (len(cols) - 1)
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def spec(method="ngram", k=4, **kw) -> SpeculativeConfig:
    draft = {"draft_model": kw.pop("draft_model", DRAFT)} if method == "draft" else {}
    return SpeculativeConfig(method=method, num_speculative_tokens=k, **draft, **kw)


@pytest.fixture
def make_pair_engine(make_engine):
    """Engines on the shipped target (float32 on CPU), with or without speculation."""

    def make(speculative=None, **kw):
        engine = make_engine(
            "llama", **{"page_size": 4, "num_pages": 512, "max_model_len": 512, "speculative": speculative, **kw}
        )
        return engine

    return make


@pytest.fixture
def pair_dirs(model_dirs, monkeypatch):
    # make_engine builds from model_dirs[arch]: point "llama" at the shipped target
    monkeypatch.setitem(model_dirs, "llama", TARGET)
    return model_dirs


async def run_all(engine, params_list, prompts):
    outs = await asyncio.gather(
        *(
            engine.complete(GenerateRequest(engine.tokenizer.encode(p), params))
            for p, params in zip(prompts, params_list, strict=True)
        )
    )
    return [(o.token_ids, o.text, o.finish_reason) for o in outs]


def assert_pools_empty(engine):
    assert engine.pool.num_free_pages == engine.pool.num_pages
    proposer = engine.spec.proposer if engine.spec else None
    if hasattr(proposer, "pool"):
        assert not proposer.sessions, "draft sessions left open"
        assert proposer.pool.num_free_pages == proposer.pool.num_pages, "draft pages leaked"


@pytest.mark.parametrize(
    "speculative",
    [spec("ngram"), spec("ngram", k=6, adaptive=False), spec("draft", k=2), spec("draft", k=5, adaptive=False)],
    ids=["ngram", "ngram-k6-fixed", "draft-k2", "draft-k5-fixed"],
)
async def test_greedy_output_is_identical_with_speculation(pair_dirs, make_pair_engine, speculative):
    params = [SamplingParams(max_tokens=40, ignore_eos=True) for _ in PROMPTS]
    plain = await run_all(make_pair_engine(), params, PROMPTS)
    engine = make_pair_engine(speculative)
    assert await run_all(engine, params, PROMPTS) == plain
    stats = engine.stats()
    assert stats.spec_proposed_tokens > 0 and stats.spec_accepted_tokens > 0
    assert stats.spec_accepted_tokens < stats.spec_proposed_tokens  # rejections happened too
    # one target step per step of the batch that verified: fewer than the sequences' verifications
    assert 0 < stats.spec_verify_steps < stats.spec_steps and stats.spec_verify_time_s > 0
    assert_pools_empty(engine)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", ["ngram", "draft"])
async def test_greedy_output_is_identical_with_speculation_on_cuda_with_graphs(pair_dirs, make_pair_engine, method):
    """On GPU the draft's steps feed their tokens to each other on the device and replay CUDA
    graphs (catch-up and decode steps), the verifier compares on the host: still the target's
    greedy output, token for token, alone and in a batch with sequences of unequal k."""
    cuda = dict(device="cuda", num_pages=1024)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (48, 40, 33, 45)]
    plain = make_pair_engine(**cuda)
    want_alone = await run_all(plain, params[:1], PROMPTS[:1])
    want = await run_all(plain, params, PROMPTS)
    engine = make_pair_engine(spec(method, k=4, adaptive=False), **cuda)
    assert engine.runner.graphs
    if method == "draft":
        assert engine.spec.proposer.runner.graphs
    assert await run_all(engine, params[:1], PROMPTS[:1]) == want_alone
    assert await run_all(engine, params, PROMPTS) == want
    assert engine.stats().spec_accepted_tokens > 0
    assert_pools_empty(engine)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("max_num_seqs", [1, 3])
@pytest.mark.parametrize("k", [4, 6])
async def test_verification_steps_replay_cuda_graphs_whenever_decode_steps_do(
    pair_dirs, make_pair_engine, max_num_seqs, k
):
    """With few sequences the verification steps (max_num_seqs x (1 + k) rows) are larger than
    any decode step: they must still find a captured graph, never run eagerly."""
    engine = make_pair_engine(
        spec("ngram", k=k, adaptive=False), device="cuda", num_pages=1024, max_num_seqs=max_num_seqs
    )
    params = [SamplingParams(max_tokens=48, ignore_eos=True) for _ in PROMPTS]
    await run_all(engine, params, PROMPTS)
    st = engine.stats()
    assert engine.runner.graphs and st.spec_steps > 0
    assert st.num_eager_decode_steps == 0
    assert_pools_empty(engine)


async def test_greedy_output_is_identical_with_a_draft_that_disagrees(model_dirs, make_engine):
    """A random draft (another tiny model) is rejected nearly always: every step then emits the
    target's own correction, which must still be its greedy choice."""
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9, 10], [100, 200, 300], list(range(20, 60))]
    plain = make_engine("llama")
    want = [(await plain.complete(GenerateRequest(p, params))).token_ids for p in prompts]
    engine = make_engine("llama", speculative=spec("draft", k=3, adaptive=False, draft_model=str(model_dirs["qwen2"])))
    got = await asyncio.gather(*(engine.complete(GenerateRequest(p, params)) for p in prompts))
    assert [o.token_ids for o in got] == want
    assert engine.stats().spec_proposed_tokens > 0
    assert_pools_empty(engine)


@pytest.mark.parametrize("speculative", [spec("ngram", adaptive=False), spec("draft", k=6, adaptive=False)])
async def test_stop_strings_and_max_tokens_inside_a_proposal_end_output_as_without_it(
    pair_dirs, make_pair_engine, speculative
):
    plain = make_pair_engine()
    engine = make_pair_engine(speculative)
    prompt = PROMPTS[0]
    full = await run_all(plain, [SamplingParams(max_tokens=60, ignore_eos=True)], [prompt])
    text = full[0][1]
    # stop strings that end at many different offsets, so some fall inside accepted proposals
    stops = [text[i : i + 4] for i in range(9, 50, 5) if text[i : i + 4].strip()]
    params = [SamplingParams(max_tokens=60, ignore_eos=True, stop=[s]) for s in stops]
    params += [SamplingParams(max_tokens=m, ignore_eos=True) for m in (1, 2, 3, 5, 7, 11, 13, 17)]
    prompts = [prompt] * len(params)
    want = await run_all(plain, params, prompts)
    assert any(r[2] is FinishReason.STOP for r in want)
    assert await run_all(engine, params, prompts) == want
    assert engine.stats().spec_accepted_tokens > 0
    assert_pools_empty(engine)


def noisy_copy(model_dir, out, noise: float):
    """The model at `model_dir` with Gaussian noise (`noise` x each tensor's std) on its weights, in `out`."""
    import shutil

    from safetensors.torch import load_file, save_file

    for f in model_dir.iterdir():
        shutil.copy(f, out / f.name)
    weights = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    noisy = {k: (v + noise * v.std() * torch.randn(v.shape, generator=gen)).contiguous() for k, v in weights.items()}
    save_file(noisy, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def near_draft(model_dirs, tmp_path_factory):
    """A draft close to the tiny Llama but not equal: its weights plus noise. It agrees often
    enough to be accepted and differs enough for rejections and residual draws."""
    return noisy_copy(model_dirs["llama"], tmp_path_factory.mktemp("near-draft"), 1.0)


@pytest.mark.parametrize(
    "method,params",
    [
        ("draft", dict(temperature=1.0, top_k=4)),
        ("draft", dict(temperature=0.8, top_p=0.7, repetition_penalty=1.3)),
        ("ngram", dict(temperature=2.0, min_p=0.02)),
    ],
)
async def test_sampled_tokens_follow_the_target_distribution(
    near_draft, model_dirs, monkeypatch, make_engine, method, params
):
    """Two-sample chi-square over the joint of the 2nd and 3rd generated tokens (the 1st comes
    from the prefill, before any speculation): with and without speculation, 1,000 seeded
    samples each. The draft is a noisy copy of the target, so acceptances, rejections and
    residual draws all happen. Fixed seeds: the test is deterministic."""
    n = 1000
    prompt = [7, 8, 9, 7, 8, 9, 7, 8]
    if method == "ngram":
        # the shipped target on repetitive code: its lookups propose what it is likely to write
        monkeypatch.setitem(model_dirs, "llama", TARGET)
        prompt = [1] + [545, 289, 325, 937, 10, 738, 291, 280, 1025, 10, 75, 11, 201] * 3
        prompt = prompt[:-3]  # "... print(": the lookup proposes what followed "print(" before

    async def sample(engine):
        reqs = [
            engine.complete(GenerateRequest(prompt, SamplingParams(max_tokens=4, ignore_eos=True, seed=i, **params)))
            for i in range(n)
        ]
        return [tuple(o.token_ids[1:3]) for o in await asyncio.gather(*reqs)]

    plain = await sample(make_engine("llama", max_num_seqs=256))
    extra = {"draft_model": str(near_draft)} if method == "draft" else {}
    engine = make_engine(
        "llama", max_num_seqs=256, speculative=spec(method, k=2, adaptive=False, max_batch_size=256, **extra)
    )
    got = await sample(engine)
    st = engine.stats()
    assert st.spec_proposed_tokens > n / 4
    assert st.spec_accepted_tokens > 0 and st.spec_accepted_tokens < st.spec_proposed_tokens
    cells = sorted(set(plain) | set(got))
    table = [[plain.count(c) for c in cells], [got.count(c) for c in cells]]
    # pool rare cells so that expected counts stay >= 5
    keep = [j for j in range(len(cells)) if table[0][j] + table[1][j] >= 10]
    rare = [j for j in range(len(cells)) if j not in keep]
    rows = [[r[j] for j in keep] + [sum(r[j] for j in rare)] for r in table]
    columns = [c for c in zip(*rows, strict=True) if sum(c) > 0]
    p_value = chi_square_p_value([list(r) for r in zip(*columns, strict=True)])
    assert p_value > 0.001, (p_value, len(cells))
    assert_pools_empty(engine)


async def test_sampled_tokens_follow_the_target_distribution_with_proposals_computed_ahead(
    model_dirs, make_engine, tmp_path
):
    """As above, for draft replicas whose proposals are computed ahead, during verification
    (workers/spec/draft_client.py): with k = 1 the 4th token is verified against a proposal made
    before the 3rd was known whenever the draft guessed the 3rd; so the joint of the 3rd and 4th
    tokens covers hits and misses alike."""
    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.spec.draft_client import RoutedDraftProposer
    from workers.spec.draft_model import DraftModel

    n = 1000
    prompt = [7, 8, 9, 7, 8, 9, 7, 8]
    # closer than near_draft: whole proposals must be accepted often for a guess to be used
    closer = noisy_copy(model_dirs["llama"], tmp_path, 0.1)
    draft = DraftModel.standalone(
        EngineConfig(
            model=str(closer),
            device="cpu",
            page_size=4,
            num_pages=4096,
            max_model_len=256,
            skip_tokenizer_init=True,
        ),
        1,
    )

    class Answered:
        def __init__(self, replies):
            self.replies = replies

        def result(self, timeout_s=None):
            return self.replies

        def cancel(self):
            pass

    def submit(call):
        replies = draft.serve(call.batch)
        for reply in replies:
            reply.replica_id = "r0"
        return Answered(replies)

    async def sample(engine):
        reqs = [
            engine.complete(
                GenerateRequest(prompt, SamplingParams(max_tokens=6, ignore_eos=True, seed=i, temperature=1.0, top_k=4))
            )
            for i in range(n)
        ]
        return [tuple(o.token_ids[2:4]) for o in await asyncio.gather(*reqs)]

    plain = await sample(make_engine("llama", max_num_seqs=256))
    # a lookahead every step (min rate 0): the joint must cover hits and misses of every state
    proposer = RoutedDraftProposer(submit, torch.device("cpu"), 4, "near-draft", timeout_s=60, lookahead_min_rate=0.0)
    speculative = spec("replicas", k=1, adaptive=False, max_batch_size=256)
    engine = Engine(
        EngineConfig(
            model=str(model_dirs["llama"]),
            device="cpu",
            page_size=4,
            num_pages=256,
            max_model_len=256,
            max_num_seqs=256,
            speculative=speculative,
        ),
        proposer=proposer,
    )
    got = await sample(engine)
    await engine.shutdown()
    assert engine.pool.num_free_pages == engine.pool.num_pages
    assert proposer.stats.num_ahead_hits > n / 10 and proposer.stats.num_ahead_misses > n / 10, proposer.stats
    st = engine.stats()
    assert 0 < st.spec_accepted_tokens < st.spec_proposed_tokens  # rejections (residual draws) too
    cells = sorted(set(plain) | set(got))
    table = [[plain.count(c) for c in cells], [got.count(c) for c in cells]]
    keep = [j for j in range(len(cells)) if table[0][j] + table[1][j] >= 10]
    rare = [j for j in range(len(cells)) if j not in keep]
    rows = [[r[j] for j in keep] + [sum(r[j] for j in rare)] for r in table]
    columns = [c for c in zip(*rows, strict=True) if sum(c) > 0]
    p_value = chi_square_p_value([list(r) for r in zip(*columns, strict=True)])
    assert p_value > 0.001, (p_value, len(cells))


async def test_seeded_sampling_repeats_with_speculation(pair_dirs, make_pair_engine):
    engine = make_pair_engine(spec("draft", k=3, adaptive=False))
    params = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True)
    a = await run_all(engine, [params], [PROMPTS[1]])
    crowd = [SamplingParams(max_tokens=20, temperature=1.0) for _ in range(3)]
    b = await run_all(engine, [params, *crowd], [PROMPTS[1], *PROMPTS[:3]])
    assert a[0] == b[0]
    assert engine.stats().spec_accepted_tokens > 0


async def test_no_pages_leak_after_many_accept_reject_rounds_and_aborts(pair_dirs, make_pair_engine):
    # A small pool: speculation competes with admission for pages, and the draft evicts sessions.
    engine = make_pair_engine(spec("draft", k=4, draft_num_pages=60), num_pages=120, max_model_len=256)
    rng = random.Random(0)
    jobs = []
    for i in range(24):
        params = SamplingParams(
            max_tokens=rng.randrange(5, 60), temperature=rng.choice([0.0, 0.7, 1.0]), seed=i, ignore_eos=True
        )
        jobs.append(engine.complete(GenerateRequest(engine.tokenizer.encode(rng.choice(PROMPTS)), params)))

    async def aborted(i):
        stream = engine.generate(
            GenerateRequest(engine.tokenizer.encode(PROMPTS[i % 4]), SamplingParams(max_tokens=80))
        )
        n = 0
        async for _ in stream:
            n += 1
            if n == 5 + i:
                break
        await stream.aclose()

    await asyncio.gather(*jobs, *(aborted(i) for i in range(4)))
    st = engine.stats()
    assert st.spec_steps > 20 and 0 < st.spec_accepted_tokens < st.spec_proposed_tokens
    assert_pools_empty(engine)


class _FlakyProposer:
    def __init__(self, inner, failures):
        self.inner, self.failures, self.calls = inner, failures, 0

    def propose(self, seqs, num_tokens):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("draft replica unreachable")
        return self.inner.propose(seqs, num_tokens)

    def release(self, request_id):
        self.inner.release(request_id)


async def test_a_failing_proposer_never_fails_a_request_and_speculation_resumes(pair_dirs, make_pair_engine):
    params = [SamplingParams(max_tokens=40, ignore_eos=True) for _ in PROMPTS]
    plain = await run_all(make_pair_engine(), params, PROMPTS)
    engine = make_pair_engine(spec("ngram", retry_after_s=0.01))
    engine.spec.proposer = _FlakyProposer(engine.spec.proposer, failures=3)
    assert await run_all(engine, params, PROMPTS) == plain
    st = engine.stats()
    assert st.spec_failures == 3 and st.spec_accepted_tokens > 0


class _BrokenProposer:
    """Answers with the wrong number of proposals, tokens outside the vocabulary, or bad q."""

    def __init__(self):
        self.calls = 0

    def propose(self, seqs, num_tokens):
        self.calls += 1
        n = len(seqs)
        if self.calls % 3 == 1:
            return Proposals([[5]] * (n + 1), [None] * (n + 1))
        if self.calls % 3 == 2:
            return Proposals([[10**6]] * n, [None] * n)
        return Proposals([[5, 6]] * n, [torch.ones(1, 3)] * n)

    def release(self, request_id):
        pass


async def test_malformed_proposals_are_failures_not_errors(pair_dirs, make_pair_engine):
    params = [SamplingParams(max_tokens=20, ignore_eos=True) for _ in PROMPTS]
    plain = await run_all(make_pair_engine(), params, PROMPTS)
    engine = make_pair_engine(spec("ngram", retry_after_s=0.001))
    engine.spec.proposer = _BrokenProposer()
    assert await run_all(engine, params, PROMPTS) == plain
    assert engine.stats().spec_failures >= 3 and engine.stats().spec_proposed_tokens == 0


def test_ngram_proposer_continues_the_latest_match_of_the_longest_suffix():
    p = NgramProposer(1, 3)
    assert p.lookup([1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]
    assert p.lookup([1, 2, 3, 4], 2) == []
    assert p.lookup([5, 6, 5], 4) == [6, 5]


def test_expected_tokens_is_the_geometric_sum():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-12


def test_adaptive_k_grows_with_acceptance_and_switches_off_when_speculation_would_slow_steps():
    decoder = SpeculativeDecoder(NgramProposer(1, 3), k_max=6, adaptive=True, probe_every=4)
    decoder._alpha, decoder._cost = 0.95, 0.01  # cheap, accurate guesses: the longest proposals pay
    assert decoder.choose_k() == 6
    decoder._alpha, decoder._cost = 0.6, 0.15
    assert 1 <= decoder.choose_k() < 6
    decoder._alpha, decoder._cost = 0.05, 0.5  # rarely right and costly: decode alone ...
    assert [decoder.choose_k() for _ in range(4)] == [0, 0, 0, 1]  # ... but probe now and then
    assert SpeculativeDecoder(NgramProposer(1, 3), k_max=6, adaptive=False).choose_k() == 6


async def test_no_speculation_above_max_batch_size(pair_dirs, make_pair_engine):
    params = [SamplingParams(max_tokens=16, ignore_eos=True) for _ in range(3)]
    engine = make_pair_engine(spec("ngram", adaptive=False, max_batch_size=2))
    three = await run_all(engine, params, PROMPTS[:3])  # three decodes per step: over the limit
    assert engine.stats().spec_proposed_tokens == 0
    assert await run_all(engine, params[:2], PROMPTS[:2]) == three[:2]
    assert engine.stats().spec_proposed_tokens > 0
