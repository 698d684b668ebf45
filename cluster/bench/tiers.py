"""`kvfleet bench serve --tiers`: the same workload with {no tier, host tier, host tier + pulls}.

Each variant runs on a fresh local cluster (prefix-aware routing, cold caches) with the workload
of `kvfleet bench serve`, sized so that the hot prefixes outgrow one replica's page pool (few
`--num-pages` per replica; serve.py's TIERS_DEFAULTS). Reported per variant: hit rate and TTFT
(as `bench serve`, with the workload's hit-rate ceiling), the replicas' host-tier and pull
counters, the machine's load average over the run (`machine`), and spilled turns (`spills`,
`--spill-period`): a fresh document computed on one replica and then asked of the next, as a turn
the router spills away from its prefix's replica: without pulls it is computed again, with them
it is pulled. Under prefix-aware routing below saturation the workload itself rarely spills, so
these are the pulls the run measures under its load.

Pull bandwidth: a pull's bytes over its wall time (request sent to pages inserted: the holder's
read, the wire, the check, the write into the pool; `pull_bandwidth_bytes_s`), or over the
transport's part alone (request sent to payload in hand; `pull_fetch_bandwidth_bytes_s`). The raw
transport it is set against (`pull_vs_replica_raw_under_load`, the issue's figure): a plain call
from one replica to another returning as many bytes as a system prompt's pages (the spills'
size) as a uint8 array, the way a payload's data travels, through the same path (the holder's
actor and Serve request wrapper, the object store: `TargetWorker.probe_raw`), made every 3 s while
the workload runs, so in the same run, on replicas under the same load (median). Also reported,
not comparable to a loaded pull: the same call replica to replica on idle replicas after the run
at the mean pull's size (`replica_raw_call_bandwidth_bytes_s`, beside the idle export path
`replica_export_fetch_bandwidth_bytes_s`), and calls from the bench's driver to a plain actor
(`raw_ray_call_bandwidth_bytes_s_at_mean_pull` idle; `raw_bandwidth_bytes_s_under_load`, 4 MiB
every 2 s during the run).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

VARIANTS = ("no_tier", "host_tier", "host_tier+pulls")


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


def _raw_bandwidth(num_bytes: int, repeats: int = 7) -> float:
    """Bytes/s of one Ray actor call returning `num_bytes` bytes to this process (median of `repeats`)."""
    import ray

    src = _source(num_bytes)
    times = [_time_get(src) for _ in range(repeats)]
    ray.kill(src)
    return num_bytes / statistics.median(times)


class _RawProbe:
    """The raw actor call's bandwidth while the workload runs: one call of `num_bytes` every
    `period_s` from a thread of this process (the same machine load the pulls see)."""

    def __init__(self, num_bytes: int, period_s: float = 2.0):
        import threading

        self.num_bytes, self.period_s = num_bytes, period_s
        self.src = _source(num_bytes)
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.times.append(_time_get(self.src))

    def stop(self) -> dict:
        import ray

        self._stop.set()
        self._thread.join()
        idle = [_time_get(self.src) for _ in range(7)]
        ray.kill(self.src)
        loaded = self.num_bytes / statistics.median(self.times) if self.times else 0.0
        return dict(
            raw_probe_bytes=self.num_bytes,
            raw_probe_calls_under_load=len(self.times),
            raw_bandwidth_bytes_s_under_load=loaded,
            raw_bandwidth_bytes_s_idle=self.num_bytes / statistics.median(idle),
        )


class _Sampler:
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


def _load_sampler() -> _Sampler:
    """The machine's 1-minute load average every 2 s (the CPU is shared: the figures' context)."""
    import os

    return _Sampler(lambda: os.getloadavg()[0], 2.0)


def _load_figures(start: float, samples: list[float]) -> dict:
    import os

    return dict(
        loadavg_1m_start=start,
        loadavg_1m_mean=statistics.fmean(samples) if samples else None,
        loadavg_1m_max=max(samples, default=None),
        loadavg_1m_end=os.getloadavg()[0],
        cpus=os.cpu_count(),
    )


def _replica_raw_sampler(app_name: str, num_pages: int, period_s: float = 3.0) -> _Sampler:
    """The raw transport replica to replica while the workload runs: every `period_s`, one replica
    (in turn) makes a plain call to the next returning as many bytes as `num_pages` pages
    (TargetWorker.probe_raw: through the replica's actor and request wrapper, the path a pull's
    fetch takes, answered by a replica that is serving the workload, like a pull's holder)."""
    import itertools

    from ray import serve

    ids = _replica_ids(app_name)
    handle = serve.get_deployment_handle("TargetWorker", app_name=app_name)
    pairs = itertools.cycle([(ids[i], ids[(i + 1) % len(ids)]) for i in range(len(ids))])

    def sample() -> tuple[int, float]:
        caller, holder = next(pairs)
        return tuple(handle.probe_raw.remote(holder, num_pages, pin_replica=caller).result(timeout_s=60))

    return _Sampler(sample, period_s)


class _SpillProbe:
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
        ids = _replica_ids(app_name)
        self.pairs = itertools.cycle([(ids[i], ids[(i + 1) % len(ids)]) for i in range(len(ids))])
        self.rng = random.Random(0x5911)
        self.sampler = _Sampler(self.spill, period_s)

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
            spill_ttft_s=dict(
                mean=statistics.fmean(ttfts),
                p50=statistics.median(ttfts),
                p90=sorted(ttfts)[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
            ),
        )


def _replica_ids(app_name: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#TargetWorker#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return sorted(n[len(prefix) :] for n in names)


def _transport_bandwidth(config, num_pages: int | None = None, repeats: int = 5) -> dict:
    """The pull path against the raw transport, replica to replica, on idle replicas: one replica
    (the holder) computes a prompt of `num_pages` pages (the run's mean pull; else max_model_len / 2
    tokens), then another replica fetches them as a pull does (`export_pages` through its transport)
    and, right after each, makes a plain call through the same actor path returning as many bytes
    (TargetWorker.probe_transport). Also the old figure: the export fetched by this process against
    a raw Ray actor call of as many bytes."""
    import random

    import ray
    from ray import serve

    from kvstore.hashing import page_hashes
    from kvstore.transport import payload_bytes
    from workers.replica_actors import ReplicaActors
    from workers.request import GenerateRequest, SamplingParams

    prefix = f"SERVE_REPLICA::{config.app_name}#TargetWorker#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    ids = sorted(n[len(prefix) :] for n in names)
    holder = ids[0]
    rng = random.Random(1)
    ps = config.engine.page_size
    tokens = num_pages * ps if num_pages else config.engine.max_model_len // 2
    tokens = min(tokens, config.engine.max_model_len - 2)
    prompt = [rng.randrange(3, 500) for _ in range(tokens)] + [7]
    hashes = page_hashes(prompt, ps, config.model_id)
    handle = serve.get_deployment_handle("TargetWorker", app_name=config.app_name)
    actors = ReplicaActors(config.app_name, "TargetWorker")  # the path a pull takes
    request = GenerateRequest(prompt, SamplingParams(max_tokens=1))
    list(handle.options(stream=True).generate.remote(request, page_hashes=hashes, pin_replica=holder))
    out: dict = {}
    if len(ids) > 1:
        r = handle.probe_transport.remote(holder, hashes, repeats, pin_replica=ids[1]).result(timeout_s=300)
        out |= dict(
            replica_probe_bytes=r["bytes"],
            replica_probe_pages=r["pages"],
            replica_export_fetch_bandwidth_bytes_s=r["bytes"] / r["fetch_s"],
            replica_raw_call_bandwidth_bytes_s=r["bytes"] / r["raw_s"],
            replica_export_fetch_vs_raw=r["raw_s"] / r["fetch_s"],
        )
    times, size = [], 0
    for _ in range(repeats + 1):  # the first call warms this handle
        t0 = time.perf_counter()
        payload = actors.call(holder, "export_pages", hashes).result(timeout_s=60)
        times.append(time.perf_counter() - t0)
        size = payload_bytes(payload)
    serve_bw = size / statistics.median(times[1:])
    raw_bw = _raw_bandwidth(size)
    return out | dict(
        idle_export_bytes=size,
        idle_export_pages=payload.num_pages,
        idle_export_bandwidth_bytes_s=serve_bw,
        raw_ray_call_bandwidth_bytes_s=raw_bw,
        idle_export_vs_raw=serve_bw / raw_bw,
    )


def _replica_figures(app_name: str) -> dict:
    """Sum of every TargetWorker replica's tier and pull counters (each asked by a pinned call)."""
    import ray
    from ray import serve

    prefix = f"SERVE_REPLICA::{app_name}#TargetWorker#"
    ids = [
        a["name"][len(prefix) :]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    ]
    handle = serve.get_deployment_handle("TargetWorker", app_name=app_name)
    out = dict(
        host_stored_pages=0,
        host_restored_pages=0,
        host_skipped_restores=0,
        pulls=0,
        pulled_pages=0,
        pulled_bytes=0,
        pull_time_s=0.0,
        pull_fetch_time_s=0.0,
        pull_request_time_s=0.0,
        pull_read_time_s=0.0,
        pull_reply_time_s=0.0,
    )
    fallbacks: dict[str, int] = {}
    phases: dict[str, float] = {}
    for rid in ids:
        st = handle.stats.remote(pin_replica=rid).result(timeout_s=60)
        out["host_stored_pages"] += st.num_host_stored_pages
        out["host_restored_pages"] += st.num_host_restored_pages
        out["host_skipped_restores"] += st.num_host_skipped_restores
        pulls = handle.pull_stats.remote(pin_replica=rid).result(timeout_s=60)
        if pulls is not None:
            out["pulls"] += pulls.num_pulls
            out["pulled_pages"] += pulls.num_pages
            out["pulled_bytes"] += pulls.num_bytes
            out["pull_time_s"] += pulls.time_s
            out["pull_fetch_time_s"] += pulls.fetch_time_s
            out["pull_request_time_s"] += pulls.request_time_s
            out["pull_read_time_s"] += pulls.read_time_s
            out["pull_reply_time_s"] += pulls.reply_time_s
            for phase, t in pulls.phase_s.items():
                phases[phase] = phases.get(phase, 0.0) + t
            for reason, n in pulls.fallbacks.items():
                fallbacks[reason] = fallbacks.get(reason, 0) + n
    out["pull_fallbacks"] = fallbacks
    out["pull_phase_s"] = phases
    return out


def _run_variant(variant: str, args, workload) -> dict:
    _run_workload, _report = workload
    from cluster.bench.serve_cluster import engine_settings, ray_settings, warm
    from cluster.config import ClusterConfig, GrpcConfig, IngressConfig, TargetConfig
    from cluster.local import ServeCluster
    from workers.config import KVTransferConfig
    from workers.models.config import ModelConfig

    engine = engine_settings(args, host_kv_cache_gib=args.host_kv_cache_gib if variant != "no_tier" else 0.0)
    config = ClusterConfig.local(args.model, **engine).model_copy(
        update={
            "target": TargetConfig(replicas=args.replicas, num_cpus=args.worker_cpus, num_gpus=args.worker_gpus),
            "ingress": IngressConfig(replicas=1, num_cpus=0.25),
            "grpc": GrpcConfig(host="127.0.0.1", port=0, http_port=0),
            "ray": ray_settings(args),
            "kv_transfer": KVTransferConfig(enabled=variant == "host_tier+pulls", timeout_s=5.0),
        }
    )
    vocab = ModelConfig.from_dir(args.model).vocab_size
    print(f"[{variant}] starting {args.replicas} replica(s) of {config.model_id}...", file=sys.stderr, flush=True)
    with ServeCluster(config, progress=lambda m: None) as cluster:
        warm(config.app_name, args, vocab)
        import os

        load_start, load = os.getloadavg()[0], _load_sampler()
        probe = _RawProbe(4 << 20) if config.kv_transfer.enabled else None
        raw_pages = args.system_len // config.engine.page_size  # a whole system prompt: what pulls move
        replica_raw = _replica_raw_sampler(config.app_name, raw_pages) if config.kv_transfer.enabled else None
        spills = None
        if args.spill_period:
            ps = config.engine.page_size
            spills = _SpillProbe(config.app_name, config.model_id, ps, vocab, args.system_len, args.spill_period)
        turns, elapsed = asyncio.run(_run_workload(cluster.grpc_target, args, vocab))
        spill_figures = spills.stop() if spills is not None else {}
        machine = _load_figures(load_start, load.stop())
        figures = _replica_figures(config.app_name) | spill_figures
        if probe is not None:
            figures |= probe.stop()
        if replica_raw is not None:
            raws = replica_raw.stop()
            if raws:
                size = raws[0][0]
                figures |= dict(
                    replica_raw_bytes_under_load=size,
                    replica_raw_calls_under_load=len(raws),
                    replica_raw_bandwidth_bytes_s_under_load=size / statistics.median(t for _, t in raws),
                )
        if figures["pulls"]:
            # in the run, under its load: bytes over the pulls' wall time (fetch + check + insert),
            # and over their transport time alone (request sent to payload in hand)
            figures["pull_bandwidth_bytes_s"] = figures["pulled_bytes"] / figures["pull_time_s"]
            figures["pull_fetch_bandwidth_bytes_s"] = figures["pulled_bytes"] / figures["pull_fetch_time_s"]
            mean_bytes = figures["pulled_bytes"] // figures["pulls"]
            figures["mean_pull_bytes"] = mean_bytes
            figures["raw_ray_call_bandwidth_bytes_s_at_mean_pull"] = raw = _raw_bandwidth(mean_bytes)
            figures["pull_vs_raw"] = figures["pull_bandwidth_bytes_s"] / raw
            figures["pull_fetch_vs_raw"] = figures["pull_fetch_bandwidth_bytes_s"] / raw
            if figures.get("raw_bandwidth_bytes_s_under_load"):  # the same load as the pulls (4 MiB calls)
                loaded = figures["raw_bandwidth_bytes_s_under_load"]
                figures["pull_vs_raw_under_load"] = figures["pull_bandwidth_bytes_s"] / loaded
                figures["pull_fetch_vs_raw_under_load"] = figures["pull_fetch_bandwidth_bytes_s"] / loaded
        if config.kv_transfer.enabled:
            mean_pages = figures["pulled_pages"] // figures["pulls"] if figures["pulls"] else None
            figures |= _transport_bandwidth(config, mean_pages)
            if figures["pulls"] and figures.get("replica_raw_bandwidth_bytes_s_under_load"):
                # the headline: pulls (whole: fetch, check, insert) against a plain call replica to
                # replica through the same path, at a system prompt's pages, in the same run and load
                raw = figures["replica_raw_bandwidth_bytes_s_under_load"]
                figures["pull_vs_replica_raw_under_load"] = figures["pull_bandwidth_bytes_s"] / raw
                figures["pull_fetch_vs_replica_raw_under_load"] = figures["pull_fetch_bandwidth_bytes_s"] / raw
            if figures["pulls"] and figures.get("replica_raw_call_bandwidth_bytes_s"):
                # the figure: pulls (whole: fetch, check, insert) against the raw transport
                # replica to replica, at the mean pull's size, in the same cluster
                raw = figures["replica_raw_call_bandwidth_bytes_s"]
                figures["pull_vs_replica_raw"] = figures["pull_bandwidth_bytes_s"] / raw
                figures["pull_fetch_vs_replica_raw"] = figures["pull_fetch_bandwidth_bytes_s"] / raw
    report = _report(variant, turns, elapsed) | {"tiers": figures, "machine": machine}
    print(
        f"[{variant}] {report['requests']} requests in {elapsed:.1f} s, hit rate {report['cache_hit_rate']:.1%}, "
        f"mean TTFT {report['ttft_s']['mean'] * 1e3:.0f} ms, {figures}",
        file=sys.stderr,
        flush=True,
    )
    return report


def _ratio(base: dict, other: dict) -> float | None:
    """How many times lower `other`'s mean spill TTFT is than `base`'s (None without spills)."""
    a, b = base.get("spill_ttft_s"), other.get("spill_ttft_s")
    return a["mean"] / b["mean"] if a and b and b["mean"] else None


def run_tiers(args, run_workload, report, table) -> dict:
    """`run_workload`, `report`, `table`: cluster/bench/serve.py's (passed in: serve.py calls this)."""
    reports = [_run_variant(v, args, (run_workload, report)) for v in (args.variants or VARIANTS)]
    print(table(reports))
    base = reports[0]
    if len(reports) < 2:
        return {"results": reports}
    ratios = {
        r["policy"]: {
            "ttft_mean_x_lower": base["ttft_s"]["mean"] / r["ttft_s"]["mean"] if r["ttft_s"]["mean"] else None,
            "ttft_p90_x_lower": base["ttft_s"]["p90"] / r["ttft_s"]["p90"] if r["ttft_s"]["p90"] else None,
            "hit_rate": r["cache_hit_rate"],
            "spill_ttft_mean_x_lower": _ratio(base["tiers"], r["tiers"]),
        }
        for r in reports[1:]
    }
    for name, r in ratios.items():
        print(f"{name} vs no_tier: mean TTFT {r['ttft_mean_x_lower']:.2f}x lower, hit rate {r['hit_rate']:.1%}")
    return {"results": reports, "vs_no_tier": ratios}
