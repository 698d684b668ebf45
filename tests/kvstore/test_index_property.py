"""Properties of `lookup` against a pure-Python model of the same index.

- Exact mode: after any sequence of publishes, removals, clock moves, heartbeats, leaves and
  clears, it answers exactly what the model answers.
- Search mode: on prefix-closed states, it answers exactly what the model (and exact mode)
  answers. The states come from page pools serving prompts of a tree of page chains (stored,
  touched and evicted pages), removals of chain tails, and expiry, which under these rules takes
  ancestors no sooner than descendants; the machine checks that the states are prefix-closed."""

from __future__ import annotations

import itertools
import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from kvstore.index import IndexConfig, PageIndex, ReplicaLoad
from kvstore.page_pool import KVEvent, KVEventKind, PagePool

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

    def lookup(self, prompt: list, candidates, now: int) -> dict[str, int]:
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
        config = IndexConfig(
            redis_url=self.url, namespace="prop", ttl_s=TTL_MS / 1000, lookup_mode="exact", timeout_ms=1000
        )
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


def test_exact_lookup_matches_a_pure_python_model_of_the_index_in_any_state(redis_server):
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


# Prompts are root paths of a tree of page chains (hashes are chained, so a prompt that diverges
# from another never meets it again): chain 0 is pages 0..119, and each later chain shares a
# leading part (at least page 0: one system prompt) of an earlier one, then has pages of its own.
def _chain_tree(seed: int = 7, num_chains: int = 8) -> list[list[int]]:
    rng = random.Random(seed)
    chains, next_page = [list(range(120))], 120
    while len(chains) < num_chains:
        parent = rng.choice(chains)
        shared, own = rng.randrange(1, len(parent)), rng.randrange(1, 120)
        chains.append(parent[:shared] + list(range(next_page, next_page + own)))
        next_page += own
    return chains


CHAINS = _chain_tree()
PARENT = {page: chain[i - 1] if i else None for chain in CHAINS for i, page in enumerate(chain)}
CHAIN_HASHES = [random.Random(10_000 + p).getrandbits(128) for p in range(len(PARENT) + 8)]
UNSEEN = CHAIN_HASHES[len(PARENT) :]  # pages nothing ever stores: a prompt's new continuation
POOL_PAGES = 256  # more than the longest chain (181 pages), fewer than the tree's 481: serving evicts

chains = st.integers(0, len(CHAINS) - 1)
lengths = st.integers(1, 200)  # clipped to the chain's length


def _below(page: int | None, ancestor: int) -> bool:
    while page is not None and page != ancestor:
        page = PARENT[page]
    return page == ancestor


class PrefixClosedMachine(RuleBasedStateMachine):
    """Replicas are page pools that serve prompts as the scheduler does when a prompt's prefill
    fits in one step; their events go to the index and to the model alike."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url

    @initialize()
    def setup(self):
        self.now = 1_700_000_000_000
        config = IndexConfig(redis_url=self.url, namespace="prop-closed", ttl_s=TTL_MS / 1000, timeout_ms=1000)
        model_id = f"model{next(_models)}"
        self.search = PageIndex(config, model_id, clock=lambda: self.now)
        self.exact = PageIndex(config.model_copy(update={"lookup_mode": "exact"}), model_id, clock=lambda: self.now)
        self.model = IndexModel()
        self.pools = {r: PagePool(POOL_PAGES, 4, replica_id=r) for r in REPLICAS}
        self.running: dict[str, list[list[int]]] = {r: [] for r in REPLICAS}  # page tables
        self.served: list[tuple[int, int]] = [(0, 1)]  # (chain, length) of the prompts served
        self.steps = 0
        for r in REPLICAS:  # live from the start, so that most lookups have runs to find
            self.set_live(r, True)

    def teardown(self):
        if hasattr(self, "search"):
            for r in REPLICAS:
                self.search.clear(r)
            self.search.close()
            self.exact.close()

    def _publish(self, events: list[KVEvent]) -> None:
        self.search.publish(events)
        for ev in events:
            held = self.model.entries[ev.replica_id]
            for h in ev.hashes:
                if ev.kind == KVEventKind.REMOVED:
                    held.pop(h, None)
                else:
                    held[h] = self.now + TTL_MS

    def _admit(self, replica: str, chain: int, length: int) -> list[int] | None:
        """Reuse the cached leading run, allocate and cache the rest; the new page table."""
        pool = self.pools[replica]
        hashes = [CHAIN_HASHES[p] for p in CHAINS[chain][:length]]
        hit = pool.lookup_prefix(hashes)
        need = len(hashes) - len(hit)
        if need + pool.num_pages_to_acquire(hit) > pool.num_free_pages:
            return None  # no room while other sequences run
        pool.acquire(hit)
        fresh = pool.allocate(need)
        pool.commit(fresh, hashes[len(hit) :])
        self._publish(pool.take_events())
        self.served.append((chain, min(length, len(hashes))))
        return hit + fresh

    @rule(replica=replicas, chain=chains, length=lengths)
    def serve(self, replica, chain, length):
        pages = self._admit(replica, chain, length)
        if pages is not None:
            self.pools[replica].free(pages)

    @rule(replica=replicas, chain=chains, length=lengths)
    def start(self, replica, chain, length):
        """Admit a prompt and leave it running (holding its pages) for a while."""
        pages = self._admit(replica, chain, length)
        if pages is not None:
            self.running[replica].append(pages)

    @rule(replica=replicas, data=st.data())
    def finish(self, replica, data):
        if self.running[replica]:
            i = data.draw(st.integers(0, len(self.running[replica]) - 1))
            self.pools[replica].free(self.running[replica].pop(i))

    @rule(replica=replicas, data=st.data())
    def remove_a_tail(self, replica, data):
        """Remove one of a served prompt's pages and every page below it in the tree, or empty
        the pool's cache of unreferenced pages."""
        chain, length = data.draw(st.sampled_from(self.served))
        start = data.draw(st.integers(-1, length - 1))
        if start < 0:
            self.pools[replica].reset_prefix_cache()
            self._publish(self.pools[replica].take_events())
            return
        cut = CHAINS[chain][start]
        gone = [CHAIN_HASHES[p] for p in PARENT if CHAIN_HASHES[p] in self.model.entries[replica] and _below(p, cut)]
        self._publish([KVEvent(KVEventKind.REMOVED, tuple(gone), replica)])

    # Quarter-TTL steps make "now == an entry's expiry" common, so the boundary is exercised.
    @rule(ms=st.one_of(st.integers(0, 4).map(lambda k: k * TTL_MS // 4), st.integers(0, TTL_MS // 2)), data=st.data())
    def advance_clock(self, ms, data):
        expiries = sorted({e for held in self.model.entries.values() for e in held.values() if e > self.now})
        if expiries and data.draw(st.booleans()):
            self.now = data.draw(st.sampled_from(expiries))  # exactly on an expiry: that entry is gone
        else:
            self.now += ms

    @rule(replica=replicas)
    def trim(self, replica):
        self.search.trim(replica)
        self.model.entries[replica] = {h: e for h, e in self.model.entries[replica].items() if e > self.now}

    @rule(replica=replicas, live=st.booleans())
    def set_live(self, replica, live):
        """Heartbeat, or leave."""
        if live:
            self.search.heartbeat(replica, ReplicaLoad())
            self.model.live.add(replica)
        else:
            self.search.leave(replica)
            self.model.live.discard(replica)

    @rule(replica=replicas)
    def restart(self, replica):
        """The replica starts again under the same id: an empty pool, and the index cleared."""
        self.search.clear(replica)
        self.model.entries[replica] = {}
        self.model.live.discard(replica)
        self.pools[replica] = PagePool(POOL_PAGES, 4, replica_id=replica)
        self.running[replica] = []

    def _check(self, chain: int, length: int, unseen: int, candidates) -> None:
        prompt = [CHAIN_HASHES[p] for p in CHAINS[chain][:length]] + UNSEEN[:unseen]
        want = self.model.lookup(prompt, candidates, self.now)
        assert self.search.lookup(prompt, candidates) == want
        assert self.exact.lookup(prompt, candidates) == want

    @rule(
        chain=chains,
        length=st.integers(0, 200),
        unseen=st.one_of(st.just(0), st.integers(1, len(UNSEEN))),
        candidates=st.lists(replicas, min_size=1, max_size=3, unique=True),
        data=st.data(),
    )
    def lookup(self, chain, length, unseen, candidates, data):
        if data.draw(st.booleans()):  # near a prompt served before: a run to find
            chain, length = data.draw(st.sampled_from(self.served))
            length = max(0, length + data.draw(st.integers(-3, 3)))
        self._check(chain, length, unseen, candidates)

    @invariant()
    def every_chain_in_turn_agrees_in_full(self):
        if hasattr(self, "search"):
            self.steps += 1
            self._check(self.steps % len(CHAINS), 200, 1, REPLICAS)

    @invariant()
    def entries_are_prefix_closed(self):
        if hasattr(self, "model"):
            for held in self.model.entries.values():
                for p, parent in PARENT.items():
                    if parent is not None and held.get(CHAIN_HASHES[p], 0) > self.now:
                        assert held.get(CHAIN_HASHES[parent], 0) > self.now, (p, parent)


def test_search_lookup_matches_the_model_on_prefix_closed_states(redis_server):
    run_state_machine_as_test(
        lambda: PrefixClosedMachine(redis_server.url),
        settings=settings(
            max_examples=60,
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
