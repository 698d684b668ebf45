"""The scheduler alone: pure Python, a fake model that 'samples' token 7 for every sequence."""

import pytest

from kvstore.page_pool import PagePool
from workers.kv_cache_manager import KVCacheManager
from workers.request import FinishReason, SamplingParams
from workers.scheduler import Scheduler, SchedulerConfig
from workers.sequence import Sequence

PS = 4


def make(num_pages=64, budget=64, max_seqs=8, chunked=True, max_model_len=64, caching=True):
    pool = PagePool(num_pages, PS, enable_prefix_caching=caching)
    cfg = SchedulerConfig(
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        enable_chunked_prefill=chunked,
        eos_token_ids=frozenset({1}),
    )
    return Scheduler(cfg, KVCacheManager(pool, "m"))


def seq(rid, prompt, max_tokens=4, **kw):
    return Sequence(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **kw))


def step(sched, token=7):
    out = sched.schedule()
    sampled = [token if s.sample else None for s in out.scheduled]
    sched.update(out, sampled)
    return out


def run_to_end(sched, max_steps=1000):
    for _ in range(max_steps):
        if not sched.has_work:
            return
        step(sched)
    raise AssertionError("did not finish")


def test_prefill_then_decode_until_max_tokens_and_pages_return():
    s = make()
    a = seq("a", range(10, 20), max_tokens=3)
    s.add(a)
    out = step(s)
    assert [(x.start, x.num_tokens, x.sample) for x in out.scheduled] == [(0, 10, True)]
    out = step(s)
    assert [(x.start, x.num_tokens) for x in out.scheduled] == [(10, 1)]
    run_to_end(s)
    assert a.output_token_ids == [7, 7, 7] and a.finish_reason is FinishReason.LENGTH
    assert s.kv_cache.pool.num_free_pages == s.kv_cache.pool.num_pages


def test_chunked_prefill_splits_a_prompt_by_the_token_budget_and_mixes_with_decodes():
    s = make(budget=8)
    a, b = seq("a", range(10, 13)), seq("b", range(20, 40))
    s.add(a)
    step(s)  # a's prompt
    s.add(b)
    out = step(s)
    # a decodes one token, b gets the 7 that remain of the budget
    assert [(x.seq.request_id, x.start, x.num_tokens, x.sample) for x in out.scheduled] == [
        ("a", 3, 1, True),
        ("b", 0, 7, False),
    ]
    out = step(s)
    assert [(x.seq.request_id, x.num_tokens) for x in out.scheduled] == [("a", 1), ("b", 7)]
    assert out.num_batched_tokens == 8


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    s = make(budget=8, chunked=False)
    s.add(seq("a", range(10, 16)))
    s.add(seq("b", range(20, 25)))
    out = step(s)
    assert [x.seq.request_id for x in out.scheduled] == ["a"]  # b's 5 tokens do not fit in 2


def test_max_num_seqs_limits_running_sequences():
    s = make(max_seqs=2)
    for i in range(3):
        s.add(seq(f"r{i}", range(10, 14)))
    out = step(s)
    assert len(out.scheduled) == 2 and len(s.waiting) == 1


def test_cached_prefix_is_skipped_and_last_token_always_computed():
    s = make()
    s.add(seq("a", range(10, 22), max_tokens=1))  # 12 tokens = 3 full pages
    run_to_end(s)
    b = seq("b", [*range(10, 22), 5, 6], max_tokens=1)
    s.add(b)
    out = step(s)
    assert (out.scheduled[0].start, out.scheduled[0].num_tokens) == (12, 2)
    assert b.num_cached_prompt_tokens == 12
    c = seq("c", range(10, 22), max_tokens=1)  # identical prompt: the last page is recomputed
    s.add(c)
    out = step(s)
    assert (out.scheduled[0].start, out.scheduled[0].num_tokens) == (8, 4)
    run_to_end(s)
    assert s.counters.prefix_cache_hits == 20
    assert s.kv_cache.pool.num_free_pages == s.kv_cache.pool.num_pages


def test_prefix_caching_off_recomputes_everything():
    s = make(caching=False)
    s.add(seq("a", range(10, 22), max_tokens=1))
    run_to_end(s)
    s.add(seq("b", range(10, 22), max_tokens=1))
    out = step(s)
    assert out.scheduled[0].start == 0


def test_preemption_frees_the_youngest_and_everything_still_finishes():
    # 6 pages of 4 tokens: two sequences of 8-token prompts + 8 outputs cannot both fit.
    s = make(num_pages=6, max_model_len=24)
    a, b = seq("a", range(10, 18), max_tokens=8), seq("b", range(30, 38), max_tokens=8)
    s.add(a)
    s.add(b)
    preempted = []
    for _ in range(200):
        if not s.has_work:
            break
        out = step(s)
        preempted += [p.request_id for p in out.preempted]
    assert preempted and set(preempted) == {"b"}
    assert a.output_token_ids == [7] * 8 and b.output_token_ids == [7] * 8
    assert s.counters.num_preemptions == len(preempted)
    assert s.kv_cache.pool.num_free_pages == s.kv_cache.pool.num_pages


def test_preempted_sequence_resumes_from_its_cached_pages():
    s = make(num_pages=6, max_model_len=24)
    a, b = seq("a", range(10, 18), max_tokens=8), seq("b", range(30, 38), max_tokens=8)
    s.add(a)
    s.add(b)
    run_to_end(s)
    assert s.counters.num_preemptions > 0
    # the prompts share nothing, so every hit is b finding its own pages again after preemption
    assert s.counters.prefix_cache_hits > 0


def test_a_lone_sequence_preempts_itself_never_others_in_a_loop():
    s = make(num_pages=4, max_model_len=16, budget=16)
    a = seq("a", range(10, 20), max_tokens=6)
    s.add(a)
    run_to_end(s)
    assert a.num_tokens == 16 and a.finish_reason is FinishReason.LENGTH  # max_model_len reached


def test_eos_and_stop_token_ids_finish_but_ignore_eos_does_not():
    s = make()
    a = seq("a", range(10, 14), max_tokens=5)
    b = seq("b", range(10, 14), max_tokens=5, stop_token_ids=[9])
    c = seq("c", range(10, 14), max_tokens=2, ignore_eos=True)
    for x in (a, b, c):
        s.add(x)
    out = s.schedule()
    s.update(out, [1, 9, 1])
    assert a.finish_reason is FinishReason.STOP and b.finish_reason is FinishReason.STOP
    assert not c.is_finished
    run_to_end(s)
    assert c.output_token_ids == [1, 7] and c.finish_reason is FinishReason.LENGTH


def test_finish_frees_pages_from_any_state():
    s = make()
    a, b = seq("a", range(10, 30)), seq("b", range(10, 30))
    s.add(a)
    s.add(b)
    s.schedule()  # a and b admitted, pages held; no update yet
    s.add(c := seq("c", range(5)))
    s.finish(a, FinishReason.ABORT)
    s.finish(c, FinishReason.ABORT)
    s.finish(b, FinishReason.ABORT)
    s.finish(b, FinishReason.ABORT)  # twice is harmless
    assert not s.has_work and s.kv_cache.pool.num_free_pages == s.kv_cache.pool.num_pages


def test_update_skips_a_sequence_finished_while_its_step_ran():
    s = make()
    a = seq("a", range(10, 14))
    s.add(a)
    out = s.schedule()
    s.finish(a, FinishReason.ABORT)
    assert s.update(out, [7]) == []
    assert a.output_token_ids == []


@pytest.mark.parametrize("budget", [1, 3, 64])
def test_full_pages_are_committed_as_they_complete(budget):
    s = make(budget=budget)
    s.add(seq("a", range(10, 23), max_tokens=4))  # 13 + 4 = 17 tokens
    run_to_end(s)
    assert s.kv_cache.pool.num_cached_pages == 4  # tokens 0..15 in 4 full pages; the 17th token's KV is never computed


def test_the_same_prefix_computed_twice_at_once_ends_up_on_shared_pages():
    s = make()
    a, b = seq("a", range(10, 22), max_tokens=3), seq("b", range(10, 22), max_tokens=3)
    s.add(a)
    s.add(b)
    step(s)  # both prefill the same 12 tokens (3 pages) in one step
    assert a.block_table[:3] == b.block_table[:3]
    assert all(s.kv_cache.pool.ref_counts[p] == 2 for p in a.block_table[:3])
    run_to_end(s)
    assert s.kv_cache.pool.num_free_pages == s.kv_cache.pool.num_pages


def test_a_recomputed_last_page_of_a_cached_prompt_is_swapped_for_the_cached_page():
    s = make()
    first = seq("a", range(10, 22), max_tokens=1)  # 3 full pages, all cached when it finishes
    s.add(first)
    run_to_end(s)
    cached = s.kv_cache.pool.lookup_prefix(first.page_hashes[:3])
    again = seq("b", range(10, 22), max_tokens=2)
    s.add(again)
    step(s)  # pages 0-1 hit; page 2 is recomputed (its logits start the answer) into a copy
    assert again.block_table[:3] == cached  # ... which commit swapped for the cached page
    run_to_end(s)
    assert s.kv_cache.pool.num_free_pages == s.kv_cache.pool.num_pages
