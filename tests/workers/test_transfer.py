"""Where a pull's holders are (`IndexLocator`, against the real page index on loopback) and the
transport's actor look-ups: the locator answers the other live replicas' leading runs (device and
host tier), re-reads who is live only every `refresh_s`, and hands those replicas to `on_live` on a
worker thread (the transport resolves their actors there, so a pull finds them cached); a failing
`on_live` changes no answer. `RayPageTransport.resolve` makes the handle once and looks each actor up
once, off the caller's loop."""

from __future__ import annotations

import asyncio
import threading

from kvstore.hashing import page_hashes
from kvstore.index import ReplicaLoad
from kvstore.page_pool import KVEvent, KVEventKind, KVTier
from tests.conftest import scaled
from workers.transfer import IndexLocator, RayPageTransport

MODEL = "m"
LOAD = ReplicaLoad(num_free_pages=8, num_total_pages=8)


class Recorder:
    def __init__(self, fail: bool = False):
        self.calls: list[tuple[list[str], int]] = []  # (replicas, thread id)
        self.fail = fail
        self.done = threading.Event()

    def __call__(self, replicas: list[str]) -> None:
        self.calls.append((sorted(replicas), threading.get_ident()))
        self.done.set()
        if self.fail:
            raise RuntimeError("control store unreachable")


def hashes() -> list:
    return page_hashes(list(range(3, 35)), 4, MODEL)  # 8 pages


def publish(index) -> None:
    h = hashes()
    index.publish([KVEvent(KVEventKind.STORED, tuple(h[:5]), "a")])
    index.publish(
        [KVEvent(KVEventKind.STORED, tuple(h[:3]), "b"), KVEvent(KVEventKind.STORED, tuple(h[3:6]), "b", KVTier.HOST)]
    )
    index.publish([KVEvent(KVEventKind.STORED, tuple(h), "me")])
    for r in ("a", "b", "me"):
        index.heartbeat(r, LOAD)


def test_the_locator_answers_the_other_replicas_and_hands_them_to_on_live_off_the_loop(make_index):
    index = make_index(MODEL)
    publish(index)
    on_live = Recorder()
    locator = IndexLocator(index.config, MODEL, "me", refresh_s=3600.0, on_live=on_live)

    async def run():
        first = await locator(hashes())
        second = await locator(hashes())  # within refresh_s: no re-read, no second on_live
        await asyncio.to_thread(on_live.done.wait, scaled(10))
        return first, second, threading.get_ident()

    try:
        first, second, loop_thread = asyncio.run(run())
    finally:
        locator.close()
    assert first == second == {"a": 5, "b": 6}  # b: 3 device pages, then 3 in its host tier
    assert [replicas for replicas, _ in on_live.calls] == [["a", "b"]]
    assert on_live.calls[0][1] != loop_thread


def test_a_failing_on_live_changes_no_answer_and_the_next_re_read_calls_it_again(make_index):
    index = make_index(MODEL)
    publish(index)
    on_live = Recorder(fail=True)
    locator = IndexLocator(index.config, MODEL, "me", refresh_s=0.0, on_live=on_live)

    async def run():
        answers = []
        for _ in range(2):
            on_live.done.clear()
            answers.append(await locator(hashes()))
            await asyncio.to_thread(on_live.done.wait, scaled(10))
            await locator._resolving  # the failure is swallowed in the thread
        return answers

    try:
        answers = asyncio.run(run())
    finally:
        locator.close()
    assert answers == [{"a": 5, "b": 6}] * 2
    assert [replicas for replicas, _ in on_live.calls] == [["a", "b"]] * 2


class FakeHandle:
    app_name, deployment_name = "app", "TargetWorker"


def test_resolve_makes_the_handle_once_and_looks_each_actor_up_once(monkeypatch):
    import workers.transfer as transfer

    made, looked_up = [], []

    def factory():
        made.append(threading.get_ident())
        return FakeHandle()

    class Actors:
        def __init__(self, app_name, deployment_name):
            self.cache = {}

        def actor(self, replica_id):
            if replica_id not in self.cache:
                looked_up.append(replica_id)
                self.cache[replica_id] = object()
            return self.cache[replica_id]

    monkeypatch.setattr(transfer, "ReplicaActors", Actors)
    transport = RayPageTransport(factory)
    threads = [threading.Thread(target=transport.resolve, args=(["a", "b"],)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    transport.resolve(["b", "c"])
    assert len(made) == 1
    assert sorted(set(looked_up)) == ["a", "b", "c"] and looked_up.count("c") == 1
