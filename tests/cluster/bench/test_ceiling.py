"""The hit-rate ceiling of a served workload, and the split of a run's misses below it."""

from cluster.bench.ceiling import hit_ceilings
from cluster.bench.serve import Turn

SYSTEM = list(range(100, 164))  # 64 tokens: 4 pages of 16


def turn(user, sent, cached, ttft=0.5, e2e=1.0, question=(7, 8, 9), replica="r0"):
    prompt = SYSTEM + list(question)
    return Turn(
        user, 0, sent=sent, ttft=ttft, e2e=e2e, prompt=prompt, answer=[1, 2], cached_tokens=cached, replica=replica
    )


def test_only_first_touches_are_below_the_ceiling_and_misses_are_split_by_when_the_page_existed():
    turns = [
        turn(0, sent=0.0, cached=0),  # first touch: the ceiling's only miss
        turn(1, sent=0.1, cached=0),  # sent before turn 0's first token: in flight
        turn(2, sent=5.0, cached=64),  # a hit
        turn(3, sent=6.0, cached=32),  # half of it recomputed although computed long before
    ]
    total = 4 * 67
    c = hit_ceilings(turns, 16)
    assert c["workload"] == 3 * 64 / total
    assert c["missed_in_flight"] == 64 / total
    assert c["missed_after_computed"] == 32 / total
    assert c["missed_in_flight_elsewhere"] == 0  # turn 1 went where turn 0 computed


def test_in_flight_misses_on_another_replica_than_the_computing_one_are_counted_apart():
    turns = [turn(0, sent=0.0, cached=0), turn(1, sent=0.1, cached=0, replica="r1"), turn(2, sent=0.2, cached=16)]
    c = hit_ceilings(turns, 16)
    assert c["missed_in_flight"] == (64 + 48) / (3 * 67)
    assert c["missed_in_flight_elsewhere"] == 64 / (3 * 67)


def test_the_last_prompt_token_and_an_answers_last_token_are_never_cacheable():
    first = Turn(0, 0, sent=0.0, ttft=0.1, e2e=0.2, prompt=SYSTEM, answer=list(range(16)))
    # the next turn's prompt is the whole first conversation: 80 tokens, 5 full pages, but the
    # answer's last token has no KV, so only the 4 system pages (and not the 5th) can hit
    second = Turn(0, 1, sent=1.0, prompt=SYSTEM + list(range(16)) + [5], cached_tokens=64)
    assert hit_ceilings([first, second], 16)["workload"] == 64 / (64 + 81)
