"""The engine's behaviour through its public API, on a tiny random Llama on CPU. Every test's
engine is checked at teardown for leaked pages and open streams (conftest.make_engine)."""

import asyncio
import dataclasses
import random

import pytest

from workers.request import (
    EngineDeadError,
    FinishReason,
    GenerateRequest,
    InvalidRequestError,
    ResourceExhaustedError,
    SamplingParams,
)


def ids(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


async def test_streams_one_delta_per_token_and_usage_at_the_end(make_engine):
    engine = make_engine()
    deltas = [d async for d in engine.generate(GenerateRequest(ids(10), SamplingParams(max_tokens=5, ignore_eos=True)))]
    assert [len(d.token_ids) for d in deltas] == [1] * 5
    assert [d.finish_reason for d in deltas] == [None] * 4 + [FinishReason.LENGTH]
    last = deltas[-1]
    assert (last.num_prompt_tokens, last.num_completion_tokens) == (10, 5)
    text = "".join(d.text for d in deltas)
    assert text == engine.tokenizer.decode([t for d in deltas for t in d.token_ids], skip_special_tokens=True)


async def test_a_shared_three_page_prefix_is_prefilled_once(make_engine):
    engine = make_engine(page_size=16)
    prefix = ids(48, seed=1)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    first = await engine.complete(GenerateRequest(prefix + ids(5, seed=2), params))
    assert first.num_cached_prompt_tokens == 0
    before = engine.stats()
    second = await engine.complete(GenerateRequest(prefix + ids(7, seed=3), params))
    after = engine.stats()
    assert second.num_cached_prompt_tokens == 48
    assert after.prefix_cache_hits - before.prefix_cache_hits == 48
    assert after.num_prefill_tokens - before.num_prefill_tokens == 7


async def test_the_prompts_page_hashes_from_the_request_are_used_not_recomputed(make_engine, monkeypatch):
    from kvstore.hashing import page_hashes
    from workers import kv_cache_manager

    engine = make_engine(page_size=16)
    prefix = ids(48, seed=1)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    hashed = []
    monkeypatch.setattr(kv_cache_manager, "page_hashes", lambda t, *a: hashed.append(len(t)) or page_hashes(t, *a))
    prompt = prefix + ids(5, seed=2)
    carried = page_hashes(prompt, 16, engine.model_id)
    first = await engine.complete(GenerateRequest(prompt, params, page_hashes=carried))
    assert first.num_cached_prompt_tokens == 0 and hashed == []  # the prompt's 3 pages came with it
    second = await engine.complete(GenerateRequest(prefix + ids(7, seed=3), params))  # a library caller: none
    assert second.num_cached_prompt_tokens == 48 and hashed == [48]
    with pytest.raises(InvalidRequestError) as e:
        await engine.complete(GenerateRequest(prompt, params, page_hashes=carried[:1]))
    assert e.value.field == "page_hashes"


async def test_seeded_sampling_repeats_and_different_seeds_differ(make_engine):
    engine = make_engine()
    prompt = ids(12)

    async def sample(seed, crowd=0):
        params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=seed, ignore_eos=True)
        others = [
            engine.complete(GenerateRequest(ids(5 + i, seed=i), SamplingParams(max_tokens=8, temperature=1.0)))
            for i in range(crowd)
        ]
        results = await asyncio.gather(engine.complete(GenerateRequest(prompt, params)), *others)
        return results[0].token_ids

    a = await sample(7)
    assert await sample(7) == a
    assert await sample(7, crowd=3) == a  # other requests in the batch change nothing
    assert await sample(8) != a


async def test_breaking_out_of_the_stream_aborts_and_frees_pages(make_engine):
    engine = make_engine()
    stream = engine.generate(GenerateRequest(ids(30), SamplingParams(max_tokens=200, ignore_eos=True)))
    async for _ in stream:
        break
    await stream.aclose()
    assert engine.stats().num_running == 0
    assert engine.pool.num_free_pages == engine.pool.num_pages


async def test_abort_by_id_ends_the_stream_with_abort(make_engine):
    engine = make_engine()
    request = GenerateRequest(ids(20), SamplingParams(max_tokens=200, ignore_eos=True))
    reasons = []
    async for delta in engine.generate(request):
        if delta.finish_reason is None and len(reasons) == 2:
            engine.abort(request.request_id)
        reasons.append(delta.finish_reason)
    assert reasons[-1] is FinishReason.ABORT and len(reasons) < 10


async def test_cancelling_the_consumer_task_aborts(make_engine):
    engine = make_engine()
    started = asyncio.Event()

    async def consume():
        async for _ in engine.generate(GenerateRequest(ids(20), SamplingParams(max_tokens=500, ignore_eos=True))):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)  # the loop applies an abort that arrived mid-step when the step returns
    assert engine.pool.num_free_pages == engine.pool.num_pages


async def test_aborting_waiting_requests_frees_everything(make_engine):
    engine = make_engine(max_num_seqs=1)
    requests = [GenerateRequest(ids(8, seed=i), SamplingParams(max_tokens=50, ignore_eos=True)) for i in range(4)]
    tasks = [asyncio.create_task(engine.complete(r)) for r in requests]
    await asyncio.sleep(0)  # every task admits its request; the engine loop has not stepped yet
    assert engine.stats().num_waiting == 4
    for r in requests:
        engine.abort(r.request_id)
    outs = await asyncio.gather(*tasks)
    assert all(o.finish_reason is FinishReason.ABORT for o in outs)


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ([], SamplingParams(), "prompt_token_ids"),
        (list(range(3, 300)), SamplingParams(), "prompt_token_ids"),  # over max_model_len 256
        ([5, 100000], SamplingParams(), "prompt_token_ids"),  # outside the vocabulary
        ([5], SamplingParams(max_tokens=0), "max_tokens"),
        ([5], SamplingParams(temperature=-0.5), "temperature"),
        ([5], SamplingParams(top_p=0.0), "top_p"),
        ([5], SamplingParams(top_p=1.5), "top_p"),
        ([5], SamplingParams(top_k=-3), "top_k"),
        ([5], SamplingParams(min_p=2.0), "min_p"),
        ([5], SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        ([5], SamplingParams(logprobs=99), "logprobs"),
        ([5], SamplingParams(stop=[""]), "stop"),
    ],
)
async def test_invalid_requests_name_the_field_and_admit_nothing(make_engine, prompt, params, field):
    engine = make_engine()
    with pytest.raises(InvalidRequestError) as err:
        await engine.complete(GenerateRequest(prompt, params))
    assert isinstance(err.value, ValueError)
    assert err.value.field == field and field in str(err.value)
    assert engine.stats().num_waiting == 0 and not engine._streams


async def test_duplicate_request_id_is_refused(make_engine):
    engine = make_engine()
    first = engine.generate(GenerateRequest(ids(5), SamplingParams(max_tokens=20), request_id="r1"))
    await first.__anext__()
    with pytest.raises(InvalidRequestError, match="request_id"):
        await engine.complete(GenerateRequest(ids(5), SamplingParams(), request_id="r1"))
    await first.aclose()


async def test_full_queue_is_resource_exhausted(make_engine):
    engine = make_engine(max_queue_len=2, max_num_seqs=1)
    requests = [GenerateRequest(ids(5, seed=i), SamplingParams(max_tokens=30)) for i in range(3)]
    tasks = [asyncio.create_task(engine.complete(r)) for r in requests]
    await asyncio.sleep(0)  # each task admits its request before the engine loop first runs
    with pytest.raises(ResourceExhaustedError, match="queue is full"):
        await tasks[2]
    for r in requests[:2]:
        engine.abort(r.request_id)
    await asyncio.gather(*tasks[:2])


async def test_stop_string_is_cut_from_the_text_and_finishes(make_engine):
    engine = make_engine()
    prompt = ids(10, seed=4)
    free = await engine.complete(GenerateRequest(prompt, SamplingParams(max_tokens=30, ignore_eos=True)))
    assert len(free.text) > 12
    stop = free.text[6:9]
    cut = free.text.index(stop)
    stopped = await engine.complete(
        GenerateRequest(prompt, SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop]))
    )
    assert stopped.text == free.text[:cut]
    assert stopped.finish_reason is FinishReason.STOP
    assert len(stopped.token_ids) < 30


async def test_stop_token_id_ends_generation_without_its_text(make_engine):
    engine = make_engine()
    prompt = ids(10, seed=5)
    free = await engine.complete(GenerateRequest(prompt, SamplingParams(max_tokens=12, ignore_eos=True)))
    stop_id = free.token_ids[4]
    first = free.token_ids.index(stop_id)
    got = await engine.complete(GenerateRequest(prompt, SamplingParams(max_tokens=12, stop_token_ids=[stop_id])))
    assert got.token_ids == free.token_ids[: first + 1]
    assert got.finish_reason is FinishReason.STOP
    assert got.text == engine.tokenizer.decode(free.token_ids[:first], skip_special_tokens=True)


async def test_eos_stops_unless_ignore_eos(make_engine):
    engine = make_engine()
    assert engine.tokenizer.eos_token_id in engine.scheduler.config.eos_token_ids
    prompt = ids(10, seed=6)
    free = await engine.complete(GenerateRequest(prompt, SamplingParams(max_tokens=12, ignore_eos=True)))
    # Declare a token that this prompt's greedy continuation reaches to be the model's EOS.
    eos = free.token_ids[2]
    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, eos_token_ids=frozenset({eos}))
    got = await engine.complete(GenerateRequest(prompt, SamplingParams(max_tokens=12)))
    assert got.finish_reason is FinishReason.STOP
    assert got.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]
    kept = await engine.complete(GenerateRequest(prompt, SamplingParams(max_tokens=12, ignore_eos=True)))
    assert kept.token_ids == free.token_ids


async def test_logprobs_report_the_chosen_token_and_top_n(make_engine):
    engine = make_engine()
    got = await engine.complete(GenerateRequest(ids(10), SamplingParams(max_tokens=4, logprobs=3, ignore_eos=True)))
    assert len(got.logprobs) == 4
    for token, lp in zip(got.token_ids, got.logprobs, strict=True):
        assert lp.chosen.token_id == token
        assert len(lp.top) == 3 and lp.top[0].token_id == token  # greedy picks the most likely
        assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
        assert lp.chosen.logprob <= 0


async def test_generation_stops_at_max_model_len(make_engine):
    engine = make_engine(max_model_len=20, num_pages=10)
    got = await engine.complete(GenerateRequest(ids(15), SamplingParams(max_tokens=100, ignore_eos=True)))
    assert len(got.token_ids) == 5 and got.finish_reason is FinishReason.LENGTH


async def test_stats_count_requests_and_tokens(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    await asyncio.gather(*(engine.complete(GenerateRequest(ids(9, seed=i), params)) for i in range(3)))
    s = engine.stats()
    assert (s.num_waiting, s.num_running, s.num_requests_finished) == (0, 0, 3)
    assert s.num_decode_tokens == 9 and s.num_prefill_tokens == 27
    assert s.num_total_pages == 256 and s.num_free_pages == 256 and s.page_size == 4


async def test_a_failing_step_fails_open_streams_and_later_calls(make_engine):
    engine = make_engine()

    def boom(out):
        raise RuntimeError("device lost")

    engine.runner.execute = boom
    with pytest.raises(EngineDeadError) as err:
        await engine.complete(GenerateRequest(ids(5), SamplingParams()))
    assert isinstance(err.value.__cause__, RuntimeError)
    with pytest.raises(EngineDeadError):
        await engine.complete(GenerateRequest(ids(5), SamplingParams()))


def test_engine_is_reusable_across_event_loops(make_engine):
    engine = make_engine()
    req = lambda: GenerateRequest(ids(6), SamplingParams(max_tokens=3))  # noqa: E731
    a = asyncio.run(engine.complete(req()))
    b = asyncio.run(engine.complete(req()))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 3
