"""The target's side of draft replicas without Ray: how a step's sequences become calls (pinned
per replica, routed by page hashes for new ones), releases, failures and the step's deadline."""

import time

import numpy as np
import pytest
import torch

from kvstore.hashing import page_hashes
from workers.request import SamplingParams
from workers.sequence import Sequence
from workers.spec.draft_client import AcceptanceRuns, RoutedDraftProposer
from workers.spec.draft_routes import DraftRoutes
from workers.spec.wire import DraftReply

PS, MODEL = 4, "draft-model"
GREEDY = SamplingParams(max_tokens=8)


def seq(request_id: str, tokens: list[int]) -> Sequence:
    return Sequence(request_id, tokens, GREEDY)


def test_new_sequences_are_grouped_by_first_page_and_routed_by_the_drafts_page_hashes():
    routes = DraftRoutes(PS, MODEL)
    shared = [1, 2, 3, 4, 5, 6, 7, 8]
    seqs = [seq("a", [*shared, 9]), seq("b", [7, 7, 7, 7, 1]), seq("c", [*shared, 10, 11]), seq("d", [5])]
    calls = routes.plan(seqs, [2, 2, 2, 2])
    assert [c.replica_id for c in calls] == [None, None, None]
    assert [c.indices for c in calls] == [[0, 2], [1], [3]]
    # the hashes the draft pool publishes: the draft model's id and page size, whole pages only
    assert calls[0].page_hashes == page_hashes([*shared, 9], PS, MODEL)
    assert calls[2].page_hashes == []  # shorter than a page: routed by load
    assert [r.num_tokens for r in calls[0].batch.requests] == [2, 2]


def test_assigned_sequences_go_out_as_one_pinned_call_per_replica_with_their_releases():
    routes = DraftRoutes(PS, MODEL)
    seqs = [seq(r, [1, 2, 3, 4, 5]) for r in "abcd"]
    (first,) = routes.plan(seqs, [3] * 4)
    routes.answered(first, [DraftReply([], None, "r1" if i % 2 else "r0") for i in range(4)])
    assert routes.assigned == {"a": "r0", "b": "r1", "c": "r0", "d": "r1"}
    routes.release("b")
    routes.release("unknown")  # never assigned: nothing to release anywhere
    calls = routes.plan(seqs[:1] + seqs[2:] + [seq("e", [1, 2, 3, 4, 5])], [3] * 4)
    by_replica = {c.replica_id: c for c in calls}
    assert set(by_replica) == {"r0", "r1", None}
    assert [r.request_id for r in by_replica["r0"].batch.requests] == ["a", "c"]
    assert by_replica["r0"].batch.released == []
    assert [r.request_id for r in by_replica["r1"].batch.requests] == ["d"]
    assert by_replica["r1"].batch.released == ["b"]  # the replica that held it releases it
    assert by_replica["r0"].page_hashes is None  # pinned calls need no hashes
    assert routes.released == {}


def test_a_failed_call_drops_its_assignments_so_its_sequences_re_route():
    routes = DraftRoutes(PS, MODEL)
    seqs = [seq("a", [1, 2, 3, 4, 5]), seq("b", [9, 9, 9, 9, 9])]
    for call in routes.plan(seqs, [2, 2]):
        routes.answered(call, [DraftReply([], None, "r0")] * len(call.indices))
    routes.release("gone")
    (call,) = routes.plan(seqs, [2, 2])
    assert call.replica_id == "r0"
    assert routes.failed(call) == 2
    assert routes.assigned == {}
    assert all(c.replica_id is None for c in routes.plan(seqs, [2, 2]))


class FakeCall:
    def __init__(self, replies=None, error=None, delay=0.0):
        self.replies, self.error, self.delay = replies, error, delay
        self.cancelled = False

    def result(self, timeout_s=None):
        if self.delay > timeout_s:
            time.sleep(timeout_s)
            raise TimeoutError("slow replica")
        if self.error:
            raise self.error
        return self.replies

    def cancel(self):
        self.cancelled = True


def make_proposer(behaviour, timeout_s=0.2, lookahead=False):
    """`behaviour(call) -> FakeCall`; the proposer answers over fake pending calls."""
    sent = []

    def submit(call):
        sent.append(call)
        return behaviour(call)

    proposer = RoutedDraftProposer(submit, torch.device("cpu"), PS, MODEL, timeout_s, lookahead)
    return proposer, sent


def test_a_failing_or_slow_replica_costs_only_its_sequences_their_proposals():
    replica_of = {"a": "r0", "b": "r1", "c": "r2"}

    def behaviour(call):
        rid = replica_of[call.batch.requests[0].request_id]
        replies = [DraftReply([7, 8], np.full((2, 5), 0.2, np.float32), rid) for _ in call.indices]
        if call.replica_id == "r1":
            return FakeCall(error=RuntimeError("actor died"))
        if call.replica_id == "r2":
            return FakeCall(replies, delay=10.0)
        return FakeCall(replies)

    proposer, sent = make_proposer(behaviour)
    seqs = [seq("a", [1] * 5), seq("b", [2] * 5), seq("c", [3] * 5)]
    first = proposer.propose(seqs, [2, 2, 2])  # routed: every call answers
    assert first.token_ids == [[7, 8]] * 3 and first.probs[0].shape == (2, 5)
    assert proposer.routes.assigned == replica_of
    start = time.monotonic()
    second = proposer.propose(seqs, [2, 2, 2])  # pinned: r1 fails, r2 misses the deadline
    assert time.monotonic() - start < 0.2 + 0.1, "the step waited past its deadline"
    assert second.token_ids == [[7, 8], [], []] and second.probs[1] is None
    assert sorted(c.replica_id for c in sent[3:]) == ["r0", "r1", "r2"]
    assert proposer.routes.assigned == {"a": "r0"}
    st = proposer.stats
    assert (st.num_calls, st.num_pinned_calls, st.num_routed_calls) == (6, 3, 3)
    assert (st.num_failed_calls, st.num_dropped, st.num_moved) == (2, 2, 0)


def test_a_step_whose_every_call_fails_raises_so_the_decoder_falls_back():
    proposer, _ = make_proposer(lambda call: FakeCall(error=RuntimeError("no replica")))
    with pytest.raises(RuntimeError, match="every draft call"):
        proposer.propose([seq("a", [1] * 5)], [2])
    assert proposer.stats.num_failed_calls == 1


def test_a_sequence_answered_off_its_pin_moves_to_the_replica_that_answered():
    answer = {"rid": "r0"}
    proposer, _ = make_proposer(lambda call: FakeCall([DraftReply([1], None, answer["rid"])] * len(call.indices)))
    s = [seq("a", [1] * 5)]
    proposer.propose(s, [1])
    answer["rid"] = "r1"  # r0 has gone; the router sent the pinned call elsewhere
    proposer.propose(s, [1])
    assert proposer.routes.assigned == {"a": "r1"} and proposer.stats.num_moved == 1


def echo_replica(replica_id="r0"):
    """A deterministic fake draft: proposes tokens (last + 1, last + 2, ...), with q rows that
    name the token they were drawn as (q[j, 0] = token j), so a test can check rows and tokens agree."""

    def behaviour(call):
        replies = []
        for r in call.batch.requests:
            last = r.token_ids[-1]
            tokens = [last + 1 + j for j in range(r.num_tokens)]
            q = np.zeros((len(tokens), 5), np.float32)
            q[:, 0] = tokens
            replies.append(DraftReply(tokens, q, replica_id, compute_s=0.25 * r.num_tokens))
        return FakeCall(replies)

    return behaviour


def test_a_lookahead_hit_answers_the_next_step_without_a_call():
    proposer, sent = make_proposer(echo_replica(), lookahead=True)
    s = seq("a", [1, 2, 3, 4, 5])
    first = proposer.propose([s], [3])
    assert first.token_ids == [[6, 7, 8]]
    # while the target verifies, the replica was asked for 3 + 1 tokens after the whole proposal
    (ahead,) = sent[1:]
    assert ahead.replica_id == "r0" and ahead.batch.requests[0].token_ids == [1, 2, 3, 4, 5, 6, 7, 8]
    assert ahead.batch.requests[0].num_tokens == 4
    s.token_ids += [6, 7, 8, 9]  # everything accepted, and the bonus token is the draft's guess (9)
    second = proposer.propose([s], [3])
    assert second.token_ids == [[10, 11, 12]]
    assert second.probs[0][:, 0].tolist() == [10, 11, 12]  # q rows of exactly those tokens
    assert len(sent) == 3 and sent[2].batch.requests[0].token_ids[-4:] == [9, 10, 11, 12]  # the next lookahead
    st = proposer.stats
    assert (st.num_calls, st.num_ahead_calls, st.num_ahead_hits, st.num_ahead_misses) == (1, 2, 1, 0)
    # the replica's own time on each kind of call, as its replies said (3 and 3 + 1 tokens here)
    assert (st.call_compute_s, st.num_ahead_read, st.ahead_compute_s) == (0.75, 1, 1.0)


@pytest.mark.parametrize(
    "accepted, rejected",
    [([6, 7, 8, 99], 0), ([6, 42], 1), ([6, 7, 8, 9, 10], 1)],
    ids=["bonus-differs", "rejected", "too-long"],
)
def test_a_lookahead_miss_calls_as_usual(accepted, rejected):
    proposer, sent = make_proposer(echo_replica(), lookahead=True)
    s = seq("a", [1, 2, 3, 4, 5])
    proposer.propose([s], [3])
    s.token_ids += accepted
    second = proposer.propose([s], [3])
    last = s.token_ids[-1]
    assert second.token_ids == [[last + 1, last + 2, last + 3]]  # what a normal call answers
    assert sent[2].batch.requests[0].token_ids == s.token_ids and sent[2].replica_id == "r0"
    assert (proposer.stats.num_ahead_hits, proposer.stats.num_ahead_misses) == (0, 1)
    # why: the target did not take exactly the whole proposal and one token, or the guess was wrong
    assert proposer.stats.num_ahead_misses_rejected == rejected


def test_a_failed_lookahead_is_a_miss_and_releases_ride_on_lookahead_calls():
    good = echo_replica()

    def behaviour(call):  # lookahead calls (k + 1 = 3 tokens) fail, normal ones answer
        if call.batch.requests and call.batch.requests[0].num_tokens == 3:
            return FakeCall(error=RuntimeError("lost"))
        return good(call)

    proposer, sent = make_proposer(behaviour, lookahead=True)
    a, b = seq("a", [1, 2, 3, 4, 5]), seq("b", [9, 9, 9, 9, 9])
    proposer.propose([a, b], [2, 2])
    proposer.release("b")  # b ended: its lookahead is forgotten, its session released on the next call
    assert set(proposer._ahead) == {"a"}
    a.token_ids += [6, 7, 8]  # would have fitted, but the lookahead failed: a normal call
    assert proposer.propose([a], [2]).token_ids == [[9, 10]]
    assert (proposer.stats.num_ahead_hits, proposer.stats.num_ahead_misses, proposer.stats.num_failed_calls) == (
        0,
        1,
        0,
    )
    assert sent[-2].batch.released == ["b"] and sent[-2].replica_id == "r0"  # the step's call carried it
    assert sent[-1].batch.requests[0].num_tokens == 3  # and the next lookahead went out


def test_acceptance_runs_are_learnt_apart_after_whole_and_partial_acceptances():
    runs = AcceptanceRuns(min_rate=0.5)
    assert runs.worth_asking(True) and runs.worth_asking(False)  # until measured: ask
    for _ in range(10):
        runs.learn(after_full=False, full=False)  # after a rejection, the next step rejects too
        runs.learn(after_full=True, full=True)
    assert not runs.worth_asking(False) and runs.worth_asking(True)
    assert AcceptanceRuns(min_rate=0.0).worth_asking(False)  # 0: always


def test_no_lookahead_after_rejections_while_such_steps_rarely_accept_everything_and_back_after_a_hit():
    proposer, sent = make_proposer(echo_replica(), lookahead=True)
    proposer.runs.min_rate = 0.5
    s = seq("a", [1, 2, 3, 4, 5])

    def ahead_calls():
        return [c for c in sent if c.batch.requests and c.batch.requests[0].num_tokens == 3]

    proposer.propose([s], [2])  # first step: a call, and a lookahead (nothing measured yet)
    for _ in range(8):  # each step accepts one of two drafted tokens, then the target's own
        s.token_ids += [s.token_ids[-1] + 1, 0]
        proposer.propose([s], [2])
    assert proposer.stats.num_ahead_skipped > 0 and not proposer.runs.worth_asking(False)
    asked = len(ahead_calls())
    s.token_ids += [s.token_ids[-1] + 1, 0]
    proposer.propose([s], [2])
    assert len(ahead_calls()) == asked < 9  # none since steps after a rejection were seen to reject again
    # the step skipped still learns: accepting everything (and the bonus) puts the sequence back in
    # the state whose steps accept everything, where a lookahead is asked for again
    last = s.token_ids[-1]
    s.token_ids += [last + 1, last + 2, 7]
    proposer.propose([s], [2])
    assert len(ahead_calls()) == asked + 1
    assert proposer.stats.num_ahead_misses == proposer.stats.num_ahead_misses_rejected  # no guess was wrong
