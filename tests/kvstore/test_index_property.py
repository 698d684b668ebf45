"""Property: after any sequence of publishes, removals, clock moves, heartbeats, leaves and clears,
`lookup` answers exactly what a pure-Python model of the same index answers."""

from __future__ import annotations

import itertools
import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from kvstore.block_pool import KVEvent, KVEventKind
from kvstore.index import IndexConfig, PageIndex, ReplicaLoad

REPLICAS = ("a", "b", "c")
TTL_MS = 1_000_000  # on the injected clock; real key TTLs stay far longer than a test
UNIVERSE = 200
# Page ids 0..UNIVERSE-1 stand for 128-bit hashes, extremes included (leading zero and 0xff bytes).
HASHES = [0, 2**128 - 1, *(random.Random(i).getrandbits(128) for i in range(2, UNIVERSE))]

# Mostly small page ids, so that replicas, prompts and removals overlap often; long runs
# (up to 160 pages) cross the lookup's scan chunks (8, 16, 32, ... pages).
page_ids = st.one_of(st.integers(0, 7), st.integers(0, UNIVERSE - 1))
page_runs = st.one_of(
    st.builds(lambda a, n: list(range(a, min(a + n, UNIVERSE))), page_ids, st.integers(0, 160)),
    st.lists(page_ids, max_size=12),
)
replicas = st.sampled_from(REPLICAS)
_models = itertools.count()


class IndexModel:
    """The index as plain dicts: replica -> page -> expiry, and the set of live replicas."""

    def __init__(self):
        self.entries: dict[str, dict[int, int]] = {r: {} for r in REPLICAS}
        self.live: set[str] = set()

    def lookup(self, prompt: list[int], candidates, now: int) -> dict[str, int]:
        out = {}
        for r in candidates:
            n = 0
            if r in self.live:
                while n < len(prompt) and self.entries[r].get(prompt[n], now) > now:
                    n += 1
            out[r] = n
        return out


class IndexMachine(RuleBasedStateMachine):
    def __init__(self, url: str):
        super().__init__()
        self.url = url

    @initialize()
    def setup(self):
        self.now = 1_700_000_000_000
        config = IndexConfig(redis_url=self.url, namespace="prop", ttl_s=TTL_MS / 1000)
        self.index = PageIndex(config, f"model{next(_models)}", clock=lambda: self.now)
        self.model = IndexModel()

    def teardown(self):
        if hasattr(self, "index"):
            for r in REPLICAS:
                self.index.clear(r)
            self.index.close()

    @rule(replica=replicas, pages=page_runs, touched=st.booleans())
    def store(self, replica, pages, touched):
        kind = KVEventKind.TOUCHED if touched else KVEventKind.STORED
        self.index.publish([KVEvent(kind, tuple(HASHES[p] for p in pages), replica)])
        for p in pages:
            self.model.entries[replica][p] = self.now + TTL_MS

    @rule(replica=replicas, pages=page_runs)
    def remove(self, replica, pages):
        self.index.publish([KVEvent(KVEventKind.REMOVED, tuple(HASHES[p] for p in pages), replica)])
        for p in pages:
            self.model.entries[replica].pop(p, None)

    @rule(replica=replicas, stored=page_runs, removed=page_runs)
    def store_then_remove_in_one_batch(self, replica, stored, removed):
        self.index.publish(
            [
                KVEvent(KVEventKind.STORED, tuple(HASHES[p] for p in stored), replica),
                KVEvent(KVEventKind.REMOVED, tuple(HASHES[p] for p in removed), replica),
            ]
        )
        for p in stored:
            self.model.entries[replica][p] = self.now + TTL_MS
        for p in removed:
            self.model.entries[replica].pop(p, None)

    # Quarter-TTL steps make "now == an entry's expiry" common, so the boundary is exercised.
    @rule(ms=st.one_of(st.integers(0, 6).map(lambda k: k * TTL_MS // 4), st.integers(0, TTL_MS * 3 // 2)))
    def advance_clock(self, ms):
        self.now += ms

    @rule(data=st.data())
    def advance_clock_to_an_entry_expiry(self, data):
        """Stand exactly on an expiry: the entry must count as gone."""
        expiries = sorted({e for held in self.model.entries.values() for e in held.values() if e > self.now})
        if expiries:
            self.now = data.draw(st.sampled_from(expiries))

    @rule(replica=replicas)
    def trim(self, replica):
        self.index.trim(replica)
        self.model.entries[replica] = {p: e for p, e in self.model.entries[replica].items() if e > self.now}

    @rule(replica=replicas)
    def heartbeat(self, replica):
        self.index.heartbeat(replica, ReplicaLoad())
        self.model.live.add(replica)

    @rule(replica=replicas)
    def leave(self, replica):
        self.index.leave(replica)
        self.model.live.discard(replica)

    @rule(replica=replicas)
    def clear(self, replica):
        self.index.clear(replica)
        self.model.entries[replica] = {}
        self.model.live.discard(replica)

    @rule(prompt=page_runs, candidates=st.lists(replicas, min_size=1, max_size=3, unique=True))
    def lookup(self, prompt, candidates):
        got = self.index.lookup([HASHES[p] for p in prompt], candidates)
        assert got == self.model.lookup(prompt, candidates, self.now)

    @invariant()
    def every_replica_agrees_on_a_long_run(self):
        if hasattr(self, "index"):
            prompt = list(range(UNIVERSE))
            got = self.index.lookup([HASHES[p] for p in prompt], REPLICAS)
            assert got == self.model.lookup(prompt, REPLICAS, self.now)


def test_lookup_matches_a_pure_python_model_of_the_index(redis_server):
    run_state_machine_as_test(
        lambda: IndexMachine(redis_server.url),
        settings=settings(
            max_examples=80,
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
