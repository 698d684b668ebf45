"""Rates measured from replicas' reports, and the router's prefill backlog (pure: the clock is passed in)."""

import pytest

from router.rates import PrefillBacklog, ReplicaRates


def report(prefill_tokens=0, prefill_time_s=0.0, decode_seqs=0, decode_time_s=0.0, **other):
    return dict(
        num_prefill_tokens=prefill_tokens,
        prefill_time_s=prefill_time_s,
        num_decode_seq_steps=decode_seqs,
        decode_time_s=decode_time_s,
        num_waiting=0,
        **other,
    )


def start(rates: ReplicaRates, rid: str = "a") -> None:
    """A replica's first report with work (its start-up: a baseline, no sample); `later` counts from it."""
    assert not rates.observe(rid, report(*STARTUP), now=0.0)


STARTUP = (100, 10.0, 10, 10.0)


def later(prefill_tokens=0, prefill_time_s=0.0, decode_seqs=0, decode_time_s=0.0):
    """A report whose counters are `STARTUP` plus these."""
    base = STARTUP
    return report(base[0] + prefill_tokens, base[1] + prefill_time_s, base[2] + decode_seqs, base[3] + decode_time_s)


def test_the_first_report_with_work_is_a_baseline_and_later_ones_mix_in_as_an_ewma():
    rates = ReplicaRates(ewma_weight=0.5)
    assert rates.rates("a", 0.0) == (None, None)
    rates.observe("a", report(), now=0.5)  # started, nothing done yet
    # the start-up work (compiles, warm-up): 1,000 tokens in 5 s is not the replica's rate
    assert not rates.observe("a", report(1_000, 5.0, 100, 2.0), now=1.0)
    assert rates.rates("a", 1.0) == (None, None)
    rates.observe("a", report(2_000, 5.5, 200, 2.2), now=2.0)  # 2k tokens/s, 2 ms a sequence
    assert rates.rates("a", 2.0) == pytest.approx((2_000, 0.002))
    rates.observe("a", report(3_000, 5.6, 300, 2.6), now=3.0)  # this second: 10k tokens/s, 4 ms a sequence
    assert rates.rates("a", 3.0) == pytest.approx((6_000, 0.003))


def test_a_report_like_the_last_or_with_too_little_work_changes_nothing_until_enough_adds_up():
    rates = ReplicaRates(ewma_weight=1.0)
    start(rates)
    rates.observe("a", later(1_000, 1.0, 100, 1.0), now=1.0)
    rates.observe("a", later(1_000, 1.0, 100, 1.0), now=2.0)  # idle
    rates.observe("a", later(1_010, 1.1, 102, 1.1), now=3.0)  # 10 tokens, 2 sequences: not a measurement
    assert rates.rates("a", 3.0) == pytest.approx((1_000, 0.01))
    rates.observe("a", later(1_100, 1.2, 110, 1.2), now=4.0)  # 100 tokens in 0.2 s since the last measurement
    assert rates.rates("a", 4.0) == pytest.approx((500, 0.02))


def test_a_rate_not_refreshed_for_max_age_is_stale():
    rates = ReplicaRates(max_age_s=30.0)
    start(rates)
    rates.observe("a", later(1_000, 0.5, 100, 0.2), now=0.0)
    assert rates.rates("a", 30.0) == pytest.approx((2_000, 0.002))
    rates.observe("a", later(1_000, 0.5, 100, 0.2), now=31.0)  # reports keep coming, but no work: no news
    assert rates.rates("a", 31.0) == (None, None)


def test_a_restarted_engine_starts_over_from_its_new_counters():
    rates = ReplicaRates(ewma_weight=1.0)
    start(rates)
    rates.observe("a", later(10_000, 1.0, 1_000, 1.0), now=1.0)
    rates.observe("a", later(200, 0.1, 20, 0.1), now=2.0)  # counters went back: a baseline, no sample
    assert rates.rates("a", 2.0) == pytest.approx((10_000, 0.001))
    rates.observe("a", later(1_200, 0.6, 120, 0.6), now=3.0)
    assert rates.rates("a", 3.0) == pytest.approx((2_000, 0.005))


def test_replicas_without_reports_or_gone_are_unknown():
    rates = ReplicaRates()
    rates.observe("a", {}, now=0.0)  # a replica that reports no engine stats (or not yet)
    assert rates.rates("a", 0.0) == (None, None)
    rates.observe("b", report(1_000, 0.5, 100, 0.2), now=0.0)
    rates.forget({"a"})
    assert rates.rates("b", 0.0) == (None, None)


def test_the_backlog_drains_at_the_prefill_rate():
    backlog = PrefillBacklog()
    assert backlog.pending("a", 0.0, 1_000) == 0
    backlog.add("a", 800, now=0.0, prefill_tokens_s=1_000)
    assert backlog.pending("a", 0.5, 1_000) == pytest.approx(300)
    backlog.add("a", 100, now=0.5, prefill_tokens_s=1_000)
    assert backlog.pending("a", 0.6, 1_000) == pytest.approx(300)
    assert backlog.pending("a", 5.0, 1_000) == 0
    backlog.forget(set())
    assert backlog.pending("a", 0.6, 1_000) == 0
