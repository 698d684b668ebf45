"""`kvfleet bench api`: what the Ray Serve + gRPC path costs over calling the engine directly.

In one run, on one model (default: a tiny random Llama, so the model's own time is small and the
path's cost shows), it measures
  1. time to first token of 1-token generations, one at a time: the engine called in-process, then
     the same prompts through the gRPC API of a local cluster (proxy -> ingress -> TargetWorker);
     the difference of the medians is the latency the serving path adds;
  2. requests/s the cluster sustains for 1-token generations with `--concurrency` streams in
     flight (asyncio gRPC client in this process), with one TargetWorker replica.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cluster.bench.stats import percentile


def _percentiles(xs: list[float]) -> dict[str, float]:
    return {f"p{round(q * 100)}_ms": percentile(xs, q) * 1e3 for q in (0.5, 0.9, 0.99)} | {"n": len(xs)}


def _prompts(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    words = ["def", "class", "return", "import", "self", "value", "path", "list", "dict", "None", "for", "in"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 24))) for _ in range(n)]


async def _engine_ttft(engine, prompts) -> list[float]:
    from workers.request import GenerateRequest, SamplingParams

    out = []
    for p in prompts:
        ids = engine.tokenizer.encode(p)
        t0 = time.perf_counter()
        async for _ in engine.generate(GenerateRequest(ids, SamplingParams(max_tokens=1, ignore_eos=True))):
            out.append(time.perf_counter() - t0)
            break
    return out


def _grpc_ttft(target: str, prompts) -> list[float]:
    import grpc

    from protos.kvfleet.v1 import generation_pb2 as pb
    from protos.kvfleet.v1 import generation_pb2_grpc as pb_grpc

    out = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for p in prompts:
            t0 = time.perf_counter()
            call = stub.Generate(pb.GenerateRequest(text=p, sampling=pb.SamplingParams(max_tokens=1, ignore_eos=True)))
            next(call)
            out.append(time.perf_counter() - t0)
            for _ in call:
                pass
    return out


async def _grpc_throughput(target: str, prompts, concurrency: int, duration_s: float) -> dict:
    import grpc

    from protos.kvfleet.v1 import generation_pb2 as pb
    from protos.kvfleet.v1 import generation_pb2_grpc as pb_grpc

    done = errors = 0
    deadline = time.perf_counter() + duration_s

    async def worker(stub, k):
        nonlocal done, errors
        i = k
        while time.perf_counter() < deadline:
            req = pb.GenerateRequest(text=prompts[i % len(prompts)], sampling=pb.SamplingParams(max_tokens=1))
            try:
                async for _ in stub.Generate(req, timeout=60):
                    pass
                done += 1
            except grpc.RpcError:
                errors += 1
            i += concurrency

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(stub, k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"requests": done, "errors": errors, "seconds": elapsed, "requests_per_s": done / elapsed}


def run_api_bench(args) -> dict:
    from cluster.config import ClusterConfig, GrpcConfig, RayConfig, TargetConfig
    from cluster.local import ServeCluster
    from workers.config import EngineConfig
    from workers.engine import Engine

    tmp = None
    model = args.model
    if model is None:
        from cluster.demo.model import build_model_dir, train_tokenizer

        tmp = tempfile.TemporaryDirectory(prefix="kvfleet-bench-")
        model = str(build_model_dir(Path(tmp.name) / "tiny-llama", "llama", tokenizer=train_tokenizer(), seed=0))
    engine_kw = dict(device=args.device, num_pages=1024, page_size=16, max_model_len=512)
    prompts = _prompts(args.num_requests, args.seed)
    warm = prompts[:10]

    engine = Engine(EngineConfig(model=model, **engine_kw))
    asyncio.run(_engine_ttft(engine, warm))
    engine_ttft = asyncio.run(_engine_ttft(engine, prompts))
    asyncio.run(engine.shutdown())
    del engine

    config = ClusterConfig.local(model, **engine_kw).model_copy(
        update={
            "target": TargetConfig(replicas=args.replicas, num_cpus=0.5),
            "grpc": GrpcConfig(host="127.0.0.1", port=0, http_port=0),
            "ray": RayConfig(num_cpus=max(4, args.replicas + 2), dashboard_port=0),
        }
    )
    with ServeCluster(config, progress=lambda m: print(m, file=sys.stderr)) as cluster:
        _grpc_ttft(cluster.grpc_target, warm)
        api_ttft = _grpc_ttft(cluster.grpc_target, prompts)
        throughput = asyncio.run(_grpc_throughput(cluster.grpc_target, prompts, args.concurrency, args.duration))
    if tmp is not None:
        tmp.cleanup()

    e, a = _percentiles(engine_ttft), _percentiles(api_ttft)
    report = {
        "model": args.model or "tiny random llama (hidden 64, 2 layers)",
        "device": args.device,
        "replicas": args.replicas,
        "ttft_engine": e,
        "ttft_api": a,
        "added_ttft_p50_ms": a["p50_ms"] - e["p50_ms"],
        "ttft_mean_engine_ms": statistics.fmean(engine_ttft) * 1e3,
        "ttft_mean_api_ms": statistics.fmean(api_ttft) * 1e3,
        "throughput_max_tokens_1": {**throughput, "concurrency": args.concurrency},
    }
    print(f"TTFT, 1-token generations one at a time ({len(prompts)} requests):")
    print(f"  engine in-process   p50 {e['p50_ms']:7.2f} ms   p90 {e['p90_ms']:7.2f} ms   p99 {e['p99_ms']:7.2f} ms")
    print(f"  gRPC -> Ray Serve   p50 {a['p50_ms']:7.2f} ms   p90 {a['p90_ms']:7.2f} ms   p99 {a['p99_ms']:7.2f} ms")
    print(f"  added by the serving path (p50): {report['added_ttft_p50_ms']:.2f} ms")
    print(
        f"throughput, max_tokens=1, {args.concurrency} streams in flight, {args.replicas} replica(s): "
        f"{throughput['requests_per_s']:.1f} requests/s ({throughput['requests']} in {throughput['seconds']:.1f} s, "
        f"{throughput['errors']} errors)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report
