"""What `kvfleet bench serve --tiers` measures beside the workload (cluster/bench/tiers.py): the
raw transport (plain Ray calls returning as many bytes as a pull moves: from the bench's driver,
or replica to replica through a pull's path while the workload runs), spilled turns, and the
machine's load average. Each in-run probe is a thread of the bench's driver (`Sampler`)."""

from __future__ import annotations

import statistics
import sys
import time

from cluster.bench.stats import percentile


def _source(num_bytes: int):
    """An actor whose `get` returns `num_bytes` bytes as a payload's data travels (a uint8 array:
    out of band, no pickling)."""
    import ray

    @ray.remote(num_cpus=0)
    class Source:
        def __init__(self, n: int):
            import numpy as np

            self.data = np.ones(n, dtype=np.uint8)

        def get(self):
            return self.data

    src = Source.remote(num_bytes)
    ray.get(src.get.remote())  # warm: actor started, first transfer done
    return src


def _time_get(src) -> float:
    import ray

    t0 = time.perf_counter()
    ray.get(src.get.remote())
    return time.perf_counter() - t0


def raw_bandwidth(num_bytes: int, repeats: int = 7) -> float:
    """Bytes/s of one Ray actor call returning `num_bytes` bytes to this process (median of `repeats`)."""
    import ray

    src = _source(num_bytes)
    times = [_time_get(src) for _ in range(repeats)]
    ray.kill(src)
    return num_bytes / statistics.median(times)


class Sampler:
    """A thread that calls `sample()` every `period_s` while the workload runs, keeping what it returns."""

    def __init__(self, sample, period_s: float):
        import threading

        self.sample, self.period_s = sample, period_s
        self.values: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.values.append(self.sample())
            except Exception as e:  # a probe that fails (a replica busy past the deadline) is left out
                print(f"probe failed: {e!r}", file=sys.stderr, flush=True)

    def stop(self) -> list:
        self._stop.set()
        self._thread.join()
        return self.values


class RawProbe:
    """The raw actor call's bandwidth while the workload runs: one call of `num_bytes` every
    `period_s` from a thread of this process (the same machine load the pulls see)."""

    def __init__(self, num_bytes: int, period_s: float = 2.0):
        self.num_bytes = num_bytes
        self.src = _source(num_bytes)
        self.sampler = Sampler(lambda: _time_get(self.src), period_s)

    def stop(self) -> dict:
        import ray

        times = self.sampler.stop()
        idle = [_time_get(self.src) for _ in range(7)]
        ray.kill(self.src)
        loaded = self.num_bytes / statistics.median(times) if times else 0.0
        return dict(
            raw_probe_bytes=self.num_bytes,
            raw_probe_calls_under_load=len(times),
            raw_bandwidth_bytes_s_under_load=loaded,
            raw_bandwidth_bytes_s_idle=self.num_bytes / statistics.median(idle),
        )


def load_sampler() -> Sampler:
    """The machine's 1-minute load average every 2 s (the CPU is shared: the figures' context)."""
    import os

    return Sampler(lambda: os.getloadavg()[0], 2.0)


def load_figures(start: float, samples: list[float]) -> dict:
    import os

    return dict(
        loadavg_1m_start=start,
        loadavg_1m_mean=statistics.fmean(samples) if samples else None,
        loadavg_1m_max=max(samples, default=None),
        loadavg_1m_end=os.getloadavg()[0],
        cpus=os.cpu_count(),
    )


def replica_raw_sampler(app_name: str, num_pages: int, period_s: float = 3.0) -> Sampler:
    """The raw transport replica to replica while the workload runs: every `period_s`, one replica
    (in turn) makes a plain call to the next returning as many bytes as `num_pages` pages
    (TargetWorker.probe_raw: through the replica's actor and request wrapper, the path a pull's
    fetch takes, answered by a replica that is serving the workload, like a pull's holder)."""
    import itertools

    from ray import serve

    ids = replica_ids(app_name)
    handle = serve.get_deployment_handle("TargetWorker", app_name=app_name)
    pairs = itertools.cycle([(ids[i], ids[(i + 1) % len(ids)]) for i in range(len(ids))])

    def sample() -> tuple[int, float]:
        caller, holder = next(pairs)
        return tuple(handle.probe_raw.remote(holder, num_pages, pin_replica=caller).result(timeout_s=60))

    return Sampler(sample, period_s)


class SpillProbe:
    """Spilled turns while the workload runs: every `period_s`, a fresh document of `doc_len`
    tokens is computed on one replica (pinned: a prefix only it holds) and then asked, with a
    question after it, of the next replica (pinned: as the router spills a turn away from the
    replica holding its prefix when that one is busy, or sends it to a new replica). Without
    pulls the second replica computes the document again; with them it pulls it from the first.
    Its TTFT and cached tokens are the spill's figures; its pulls are the run's pulls under load."""

    def __init__(self, app_name: str, model_id: str, page_size: int, vocab: int, doc_len: int, period_s: float):
        import itertools
        import random

        from ray import serve

        self.model_id, self.page_size, self.vocab, self.doc_len = model_id, page_size, vocab, doc_len
        self.handle = serve.get_deployment_handle("TargetWorker", app_name=app_name).options(stream=True)
        ids = replica_ids(app_name)
        self.pairs = itertools.cycle([(ids[i], ids[(i + 1) % len(ids)]) for i in range(len(ids))])
        self.rng = random.Random(0x5911)
        self.sampler = Sampler(self.spill, period_s)

    def _send(self, prompt: list[int], replica: str) -> tuple[float, int]:
        """(TTFT, cached prompt tokens) of one 1-token request pinned to `replica`."""
        from kvstore.hashing import page_hashes
        from workers.request import GenerateRequest, SamplingParams

        hashes = page_hashes(prompt, self.page_size, self.model_id)
        request = GenerateRequest(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        t0, ttft, cached = time.perf_counter(), None, 0
        for delta in self.handle.generate.remote(request, page_hashes=hashes, pin_replica=replica):
            ttft = time.perf_counter() - t0 if ttft is None else ttft
            cached = delta.num_cached_prompt_tokens or cached
        return ttft, cached

    def spill(self) -> dict:
        holder, spilled = next(self.pairs)
        tokens = lambda n: [self.rng.randrange(3, self.vocab) for _ in range(n)]  # noqa: E731
        doc = tokens(self.doc_len)
        self._send(doc + tokens(8), holder)
        ttft, cached = self._send(doc + tokens(8), spilled)
        return dict(ttft_s=ttft, cached_tokens=cached, prompt_tokens=self.doc_len + 8)

    def stop(self) -> dict:
        spills = self.sampler.stop()
        if not spills:
            return dict(spills=0)
        ttfts = [s["ttft_s"] for s in spills]
        return dict(
            spills=len(spills),
            spill_doc_tokens=self.doc_len,
            spill_hit_rate=sum(s["cached_tokens"] for s in spills) / sum(s["prompt_tokens"] for s in spills),
            spill_ttft_s=dict(mean=statistics.fmean(ttfts), p50=percentile(ttfts, 0.5), p90=percentile(ttfts, 0.9)),
        )


def replica_ids(app_name: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#TargetWorker#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return sorted(n[len(prefix) :] for n in names)
