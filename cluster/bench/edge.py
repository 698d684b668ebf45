"""Figures of the API edge under hostile input (issue 16), on a local cluster started here.

    python -m cluster.bench.edge [--out bench/results/edge-hardening-cpu.json]

Local mode as `kvfleet serve` starts it (the demo model on CPU, gRPC on 127.0.0.1, a private
Redis), on free ports. Measures: the time to refuse a 10 MB prompt and a 1 MB stop string (and a
message over limits.max_request_bytes, refused by Serve's proxy), the resident memory of the
ingress and the TargetWorker replica meanwhile, the time to first token of good requests alone and
while bad ones keep arriving, and the addresses every process of the cluster listens on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import grpc
import psutil

from cluster.cli import demo_model
from cluster.config import ClusterConfig, RayConfig
from cluster.local import ServeCluster
from kvstore.redis_server import free_port
from protos.kvfleet.v1 import generation_pb2 as pb
from protos.kvfleet.v1 import generation_pb2_grpc as pb_grpc

BIG = [("grpc.max_send_message_length", 64 * 2**20)]


def _procs() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _find(title: str) -> psutil.Process:
    for p in _procs():
        try:
            if any(title in part for part in p.cmdline()):
                return p
        except psutil.Error:
            pass
    raise LookupError(title)


def listening() -> list[dict]:
    pids = {p.pid: p for p in _procs()}
    out = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                cmd = pids[c.pid].cmdline()
                scripts = [Path(part).name for part in cmd if part.endswith(".py")]
                name = cmd[0].strip() if cmd[0].startswith("ray::") else " ".join([Path(cmd[0]).name, *scripts[:1]])
            except (psutil.Error, IndexError):
                name = "?"
            out.append({"address": f"{c.laddr.ip}:{c.laddr.port}", "process": name})
    return sorted(out, key=lambda r: (r["process"], r["address"]))


class RssSampler:
    def __init__(self, procs: dict[str, psutil.Process], period_s: float = 0.02):
        self.procs, self.period_s = procs, period_s
        self.peak = {name: 0 for name in procs}
        self.base = {name: p.memory_info().rss for name, p in procs.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.period_s):
            for name, p in self.procs.items():
                self.peak[name] = max(self.peak[name], p.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        mib = 2**20
        return {n: {"before_mib": self.base[n] / mib, "peak_mib": self.peak[n] / mib} for n in self.procs}


def time_refusal(stub, request: pb.GenerateRequest, trials: int) -> dict:
    times, code, details = [], None, ""
    for _ in range(trials):
        start = time.perf_counter()
        try:
            list(stub.Generate(request, timeout=120))
        except grpc.RpcError as e:
            code, details = e.code().name, e.details()
        times.append((time.perf_counter() - start) * 1000)
    return {"code": code, "details": details[:160], "ms": times, "median_ms": statistics.median(times)}


async def ttft_run(target: str, n_good: int, concurrency: int, bad: bool) -> dict:
    async with grpc.aio.insecure_channel(target, options=BIG) as channel:
        stub = pb_grpc.GenerationStub(channel)
        sem = asyncio.Semaphore(concurrency)
        ttfts: list[float] = []
        stop = asyncio.Event()
        bad_count = {"sent": 0, "invalid_argument": 0, "other": 0}

        async def good(i):
            async with sem:
                req = pb.GenerateRequest(
                    text=f"def f{i}(x):", sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True)
                )
                start = time.perf_counter()
                async for r in stub.Generate(req, timeout=120):
                    if r.token_ids:
                        ttfts.append((time.perf_counter() - start) * 1000)
                        break

        bads = [
            pb.GenerateRequest(text="x" * 10_000_000),
            pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(stop=["y" * 1_000_000])),
            pb.GenerateRequest(text="hi", request_id="r" * 100_000),
        ]

        async def bad_loop(k):
            i = k
            while not stop.is_set():
                bad_count["sent"] += 1
                try:
                    async for _ in stub.Generate(bads[i % len(bads)], timeout=120):
                        pass
                    bad_count["other"] += 1
                except grpc.aio.AioRpcError as e:
                    key = "invalid_argument" if e.code() == grpc.StatusCode.INVALID_ARGUMENT else "other"
                    bad_count[key] += 1
                i += 1

        loops = [asyncio.create_task(bad_loop(k)) for k in range(2)] if bad else []
        start = time.perf_counter()
        await asyncio.gather(*(good(i) for i in range(n_good)))
        elapsed = time.perf_counter() - start
        stop.set()
        await asyncio.gather(*loops)
    ttfts.sort()
    return {
        "n": len(ttfts),
        "p50_ms": ttfts[len(ttfts) // 2],
        "p99_ms": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))],
        "seconds": elapsed,
        "bad_requests": bad_count if bad else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/edge-hardening-cpu.json")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--good", type=int, default=200)
    args = parser.parse_args()

    config = ClusterConfig.local(demo_model())
    config = config.model_copy(
        update={"ray": RayConfig(dashboard_port=free_port()), "grpc": config.grpc.model_copy(update={"port": 0})}
    )
    with ServeCluster(config, progress=lambda m: None) as cluster:
        target = cluster.grpc_target
        result: dict = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
            "model": config.model_id,
            "limits": config.limits.model_dump(),
            "listening": listening(),
        }
        procs = {
            "ingress": _find("GenerationIngress"),
            "target_worker": _find("TargetWorker"),
            "proxy": _find("ProxyActor"),
        }
        with grpc.insecure_channel(target, options=BIG) as channel:
            stub = pb_grpc.GenerationStub(channel)
            list(stub.Generate(pb.GenerateRequest(text="def f(", sampling=pb.SamplingParams(max_tokens=2))))
            with RssSampler(procs) as rss:
                result["refuse_10mb_prompt"] = time_refusal(
                    stub, pb.GenerateRequest(text="x" * 10_000_000), args.trials
                )
                result["refuse_1mb_stop_string"] = time_refusal(
                    stub, pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(stop=["y" * 1_000_000])), args.trials
                )
                result["refuse_40mb_message_at_proxy"] = time_refusal(
                    stub, pb.GenerateRequest(text="x" * 40_000_000), args.trials
                )
            result["rss_during_refusals"] = rss.report()
        result["ttft_good_alone"] = asyncio.run(ttft_run(target, args.good, 8, bad=False))
        result["ttft_good_with_bad_arriving"] = asyncio.run(ttft_run(target, args.good, 8, bad=True))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
