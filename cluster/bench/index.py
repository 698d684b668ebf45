"""`kvfleet bench index`: the Redis page index's lookup latency, publish throughput and memory.

Runs against a private local server (`kvstore.redis_server`) unless given a `redis_url`, under a
namespace of its own that it deletes afterwards.

- Lookup latency, end to end through `PageIndex.lookup` (client encoding, one EVALSHA, reply
  parsing), p50/p99 over `iterations` lookups, for each lookup mode x layout x prompt length x
  replica count. *Realistic*: each of 8 prompts is held in full by 3 replicas and as a prefix of
  random length by a quarter of them, and every replica also holds as many unrelated pages as a
  prompt has. *Worst* (for exact mode): every replica holds every page of the prompt, so exact
  mode checks them all. Both layouts are prefix-closed, so both modes must give the same answers;
  the bench checks that they do. `server us` is the server's own time per call (INFO
  commandstats, which times the script's inner commands too), the rest is the client.
- Publish throughput: one replica's `Publisher` fed events of `event_pages` pages from a loop, as
  the engine would, until all are written (page entries per second).
- Memory: INFO used_memory before and after indexing replicas x pages entries, per entry, for
  the schema's 16-byte members and, for comparison, 32-hex-digit string members.
"""

from __future__ import annotations

import json
import random
import statistics
import time
import uuid
from pathlib import Path

import redis

from cluster.bench.stats import percentile
from kvstore.hashing import hash_to_str
from kvstore.index import IndexConfig, LookupMode, PageIndex, ReplicaLoad
from kvstore.page_pool import KVEvent, KVEventKind
from kvstore.publisher import Publisher
from kvstore.redis_server import LocalRedisServer

NUM_PROMPTS = 8
FULL_HOLDERS = 3


def _rand_pages(rng: random.Random, n: int) -> list[int]:
    return [rng.getrandbits(128) for _ in range(n)]


def _store(index: PageIndex, replica: str, pages: list[int]) -> None:
    for i in range(0, len(pages), 4096):
        index.publish([KVEvent(KVEventKind.STORED, tuple(pages[i : i + 4096]), replica)])


def _populate(index: PageIndex, rng: random.Random, num_pages: int, replicas: list[str], layout: str) -> list:
    prompts = [_rand_pages(rng, num_pages) for _ in range(NUM_PROMPTS if layout == "realistic" else 1)]
    for r in replicas:
        index.heartbeat(r, ReplicaLoad(num_total_pages=1 << 16))
    if layout == "worst":
        for r in replicas:
            _store(index, r, prompts[0])
        return prompts
    for r in replicas:
        _store(index, r, _rand_pages(rng, num_pages))  # unrelated pages
    for prompt in prompts:
        holders = rng.sample(replicas, FULL_HOLDERS + max(1, len(replicas) // 4))
        for i, r in enumerate(holders):
            _store(index, r, prompt if i < FULL_HOLDERS else prompt[: rng.randrange(1, num_pages)])
    return prompts


def _bench_lookup(
    index: PageIndex, admin: redis.Redis, rng: random.Random, prompts: list, replicas: list[str], iterations: int
) -> dict:
    for _ in range(20):  # warm-up: connection, script cache
        index.lookup(rng.choice(prompts), replicas)
    admin.config_resetstat()
    lat = []
    matched = 0
    for _ in range(iterations):
        prompt = rng.choice(prompts)
        t = time.perf_counter()
        answer = index.lookup(prompt, replicas)
        lat.append((time.perf_counter() - t) * 1e3)
        if len(answer) != len(replicas):
            raise RuntimeError(f"lookup failed during the benchmark: {index.metrics}")
        matched += sum(answer.values())
    server = admin.info("commandstats").get("cmdstat_evalsha", {})
    return {
        "p50_ms": statistics.median(lat),
        "p99_ms": percentile(lat, 0.99),
        "max_ms": max(lat),
        "server_us_per_call": server.get("usec_per_call", float("nan")),
        "mean_matched_pages_per_lookup": matched / iterations,
    }


def _bench_publish(config: IndexConfig, rng: random.Random, total_pages: int, event_pages: int) -> dict:
    # A queue that holds the whole run: this measures how fast Redis takes the events, not drops.
    index = PageIndex(config.model_copy(update={"max_queued_pages": total_pages}), "publish-bench")
    pub = Publisher(index, "p0").start()
    pub.flush(5.0)
    pages = _rand_pages(rng, total_pages)
    events = [
        KVEvent(KVEventKind.STORED, tuple(pages[i : i + event_pages]), "p0") for i in range(0, total_pages, event_pages)
    ]
    t = time.perf_counter()
    submit_s = 0.0
    for ev in events:
        s = time.perf_counter()
        pub.submit([ev])
        submit_s += time.perf_counter() - s
    done = pub.flush(120.0)
    elapsed = time.perf_counter() - t
    m = pub.metrics
    pub.close()
    index.close()
    return {
        "events": len(events),
        "pages": total_pages,
        "event_pages": event_pages,
        "seconds": elapsed,
        "finished": done,
        "pages_per_s": m.published_pages / elapsed,
        "events_per_s": m.published_events / elapsed,
        "dropped_pages": m.dropped_pages,
        "submit_us_per_event": submit_s / len(events) * 1e6,
    }


def _bench_memory(config: IndexConfig, admin: redis.Redis, rng: random.Random, replicas: int, pages: int) -> dict:
    index = PageIndex(config, "memory-bench")
    out = {}
    for fmt in ("bytes16", "hex32"):
        time.sleep(0.2)
        before = admin.info("memory")["used_memory"]
        keys = []
        for r in range(replicas):
            hashes = _rand_pages(rng, pages)
            if fmt == "bytes16":
                _store(index, f"r{r}", hashes)
                keys.append(index.keys.pages(f"r{r}"))
            else:  # what the schema would cost with hash_to_str members
                key = f"{config.namespace}:{{memory-bench}}:hex:r{r}"
                expiry = int(time.time() * 1000) + 300_000
                for i in range(0, pages, 4096):
                    admin.zadd(key, {hash_to_str(h): expiry for h in hashes[i : i + 4096]})
                keys.append(key)
        after = admin.info("memory")["used_memory"]
        usage = sum(admin.memory_usage(k, samples=0) for k in keys)
        entries = replicas * pages
        out[fmt] = {
            "entries": entries,
            "used_memory_bytes_per_entry": (after - before) / entries,
            "memory_usage_bytes_per_entry": usage / entries,
        }
        admin.delete(*keys)
    index.close()
    return out


def run_index_bench(
    redis_url: str | None = None,
    pages: tuple[int, ...] = (64, 512, 2048),
    replicas: tuple[int, ...] = (8, 64),
    iterations: int = 300,
    publish_pages: int = 200_000,
    event_pages: int = 16,
    seed: int = 0,
    json_path: str | None = None,
    lookup_modes: tuple[LookupMode, ...] = ("search", "exact"),
) -> dict:
    server = None if redis_url else LocalRedisServer().start()
    url = redis_url or server.url
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    config = IndexConfig(redis_url=url, namespace=namespace, timeout_ms=1000, ttl_s=3600, heartbeat_ttl_s=3600)
    admin = redis.Redis.from_url(url)
    rng = random.Random(seed)
    info = admin.info("server")
    report: dict = {
        "server": f"{info.get('server_name', 'redis')} {info.get('valkey_version', info['redis_version'])}",
        "allocator": admin.info("memory").get("mem_allocator"),
        "iterations": iterations,
        "lookup_modes": list(lookup_modes),
        "lookup": [],
    }
    try:
        print(f"server: {report['server']} ({report['allocator']}), {url.rpartition('@')[2]}")
        print(
            f"{'mode':<8}{'layout':<10}{'pages':>6}{'replicas':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
            f"{'server us':>11}"
        )
        for layout in ("realistic", "worst"):
            for n in pages:
                for r in replicas:
                    model_id = f"lookup-{layout}-{n}-{r}"
                    names = [f"replica-{i}" for i in range(r)]
                    writer = PageIndex(config, model_id)
                    cell = f"{seed}:{layout}:{n}:{r}"  # the same index and prompts whichever modes run
                    prompts = _populate(writer, random.Random(cell), n, names, layout)
                    answers = {}
                    for mode in lookup_modes:
                        index = PageIndex(config.model_copy(update={"lookup_mode": mode}), model_id)
                        answers[mode] = [index.lookup(p, names) for p in prompts]
                        row = {"mode": mode, "layout": layout, "pages": n, "replicas": r}
                        row |= _bench_lookup(index, admin, random.Random(cell), prompts, names, iterations)
                        report["lookup"].append(row)
                        print(
                            f"{mode:<8}{layout:<10}{n:>6}{r:>9}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}"
                            f"{row['max_ms']:>9.3f}{row['server_us_per_call']:>11.0f}"
                        )
                        index.close()
                    if any(a != answers[lookup_modes[0]] for a in answers.values()):
                        raise RuntimeError(f"lookup modes disagree on a prefix-closed index ({layout}, {n}, {r})")
                    for name in names:
                        writer.clear(name)
                    writer.close()

        pub = report["publish"] = _bench_publish(config, rng, publish_pages, event_pages)
        print(
            f"publish: {pub['pages']} pages in events of {event_pages}: {pub['pages_per_s']:,.0f} pages/s "
            f"({pub['events_per_s']:,.0f} events/s), {pub['dropped_pages']} dropped, "
            f"submit {pub['submit_us_per_event']:.1f} us/event"
        )
        mem = report["memory"] = _bench_memory(config, admin, rng, replicas=64, pages=2048)
        for fmt, m in mem.items():
            print(
                f"memory ({fmt} members): {m['used_memory_bytes_per_entry']:.1f} bytes per (page, replica) entry "
                f"by INFO used_memory, {m['memory_usage_bytes_per_entry']:.1f} by MEMORY USAGE ({m['entries']} entries)"
            )
    finally:
        for key in admin.scan_iter(f"{namespace}:*", count=1000):
            admin.delete(key)
        admin.close()
        if server is not None:
            server.close()
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    run_index_bench()
