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
the workload runs, so in the same run, on replicas under the same load (median; the pulls'
figure is their total bytes over their total time, so `pull_vs_replica_raw_total_under_load` sets
it against the raw calls taken the same way). What "raw" leaves out: the raw call's answer is a
buffer already in the holder's memory, and the caller maps it from the object store without
reading it; a pull must also gather the pages out of the holder's pool and write them into the
receiver's: two passes over the bytes that the raw call does not make. Also reported,
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

from cluster.bench import tier_probes as probes

VARIANTS = ("no_tier", "host_tier", "host_tier+pulls")


def _transport_bandwidth(config, num_pages: int | None = None, repeats: int = 5) -> dict:
    """The pull path against the raw transport, replica to replica, on idle replicas: one replica
    (the holder) computes a prompt of `num_pages` pages (the run's mean pull; else max_model_len / 2
    tokens), then another replica fetches them as a pull does (`export_pages` through its transport)
    and, right after each, makes a plain call through the same actor path returning as many bytes
    (TargetWorker.probe_transport). Also the old figure: the export fetched by this process against
    a raw Ray actor call of as many bytes."""
    import random

    from ray import serve

    from kvstore.hashing import page_hashes
    from kvstore.transport import payload_bytes
    from workers.replica_actors import ReplicaActors
    from workers.request import GenerateRequest, SamplingParams

    ids = probes.replica_ids(config.app_name)
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
    raw_bw = probes.raw_bandwidth(size)
    return out | dict(
        idle_export_bytes=size,
        idle_export_pages=payload.num_pages,
        idle_export_bandwidth_bytes_s=serve_bw,
        raw_ray_call_bandwidth_bytes_s=raw_bw,
        idle_export_vs_raw=serve_bw / raw_bw,
    )


def _replica_figures(app_name: str) -> dict:
    """Sum of every TargetWorker replica's tier and pull counters (each asked by a pinned call)."""
    from ray import serve

    ids = probes.replica_ids(app_name)
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

        load_start, load = os.getloadavg()[0], probes.load_sampler()
        probe = probes.RawProbe(4 << 20) if config.kv_transfer.enabled else None
        raw_pages = args.system_len // config.engine.page_size  # a whole system prompt: what pulls move
        replica_raw = probes.replica_raw_sampler(config.app_name, raw_pages) if config.kv_transfer.enabled else None
        spills = None
        if args.spill_period:
            ps = config.engine.page_size
            spills = probes.SpillProbe(config.app_name, config.model_id, ps, vocab, args.system_len, args.spill_period)
        turns, elapsed = asyncio.run(_run_workload(cluster.grpc_target, args, vocab))
        spill_figures = spills.stop() if spills is not None else {}
        machine = probes.load_figures(load_start, load.stop())
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
                    # ... and as the pulls' figure is taken: all bytes over all the calls' time
                    replica_raw_total_bandwidth_bytes_s_under_load=size * len(raws) / sum(t for _, t in raws),
                )
        if figures["pulls"]:
            # in the run, under its load: bytes over the pulls' wall time (fetch + check + insert),
            # and over their transport time alone (request sent to payload in hand)
            figures["pull_bandwidth_bytes_s"] = figures["pulled_bytes"] / figures["pull_time_s"]
            figures["pull_fetch_bandwidth_bytes_s"] = figures["pulled_bytes"] / figures["pull_fetch_time_s"]
            mean_bytes = figures["pulled_bytes"] // figures["pulls"]
            figures["mean_pull_bytes"] = mean_bytes
            figures["raw_ray_call_bandwidth_bytes_s_at_mean_pull"] = raw = probes.raw_bandwidth(mean_bytes)
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
                # like for like in the statistic: the raw calls' total bytes over their total time
                total = figures["replica_raw_total_bandwidth_bytes_s_under_load"]
                figures["pull_vs_replica_raw_total_under_load"] = figures["pull_bandwidth_bytes_s"] / total
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
