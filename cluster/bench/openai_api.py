"""The OpenAI HTTP API against the gRPC API on one local cluster, in one run (issue 21's figures).

    python -m cluster.bench.openai_api [--requests 200] [--concurrency 16] [--duration 20] [--json out.json]

1. Time to first token of 1-token completions, one at a time, HTTP and gRPC alternating request by
   request (so a shared machine's drift moves both): HTTP is a raw keep-alive connection reading
   the server-sent events (`POST /v1/completions`, stream: true) until the first token's event;
   gRPC is `Generate` until its first message. Same prompts, same cluster.
2. Requests/s one ingress replica sustains for 1-token completions with `--concurrency` requests in
   flight (aiohttp for HTTP, grpc.aio for gRPC), one after the other, one TargetWorker replica.

The model is the tiny random Llama of `kvfleet bench api`, so the path's cost shows, not the model's.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from cluster.bench.stats import percentile
from protos.kvfleet.v1 import generation_pb2 as pb
from protos.kvfleet.v1 import generation_pb2_grpc as pb_grpc


def _prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["def", "class", "return", "import", "self", "value", "path", "list", "dict", "None", "for", "in"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 24))) for _ in range(n)]


def _summary(xs: list[float]) -> dict[str, float]:
    return {f"p{round(q * 100)}_ms": percentile(xs, q) * 1e3 for q in (0.5, 0.9, 0.99)} | {"n": len(xs)}


def _body(prompt: str, stream: bool) -> bytes:
    return json.dumps({"prompt": prompt, "max_tokens": 1, "ignore_eos": True, "stream": stream}).encode()


def ttft(http_url: str, grpc_target: str, prompts: list[str]) -> tuple[list[float], list[float]]:
    url = urlsplit(f"{http_url}/completions")
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    http_s, grpc_s = [], []
    with grpc.insecure_channel(grpc_target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for p in prompts:
            t0 = time.perf_counter()
            conn.request("POST", url.path, body=_body(p, True), headers=headers)
            response = conn.getresponse()
            while True:
                line = response.readline()
                if line.startswith(b"data: ") and b'"text":""' not in line:
                    http_s.append(time.perf_counter() - t0)
                    break
            response.read()  # the rest of the stream, so the connection is reused
            t0 = time.perf_counter()
            call = stub.Generate(pb.GenerateRequest(text=p, sampling=pb.SamplingParams(max_tokens=1, ignore_eos=True)))
            next(call)
            grpc_s.append(time.perf_counter() - t0)
            for _ in call:
                pass
    conn.close()
    return http_s, grpc_s


async def _loop(one, concurrency: int, duration_s: float) -> dict:
    done = errors = 0
    deadline = time.perf_counter() + duration_s

    async def worker(k: int):
        nonlocal done, errors
        i = k
        while time.perf_counter() < deadline:
            try:
                await one(i)
                done += 1
            except Exception:
                errors += 1
            i += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {"requests": done, "errors": errors, "seconds": elapsed, "requests_per_s": done / elapsed}


async def http_throughput(http_url: str, prompts, concurrency: int, duration_s: float) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one(i: int):
            body = _body(prompts[i % len(prompts)], False)
            headers = {"Content-Type": "application/json"}
            async with session.post(f"{http_url}/completions", data=body, headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(r.status)
                await r.read()

        return await _loop(one, concurrency, duration_s)


async def grpc_throughput(target: str, prompts, concurrency: int, duration_s: float) -> dict:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def one(i: int):
            req = pb.GenerateRequest(text=prompts[i % len(prompts)], sampling=pb.SamplingParams(max_tokens=1))
            async for _ in stub.Generate(req, timeout=60):
                pass

        return await _loop(one, concurrency, duration_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()

    from cluster.config import ClusterConfig, GrpcConfig, RayConfig, TargetConfig
    from cluster.demo_model import build_model_dir, train_tokenizer
    from cluster.local import ServeCluster

    tmp = tempfile.TemporaryDirectory(prefix="kvfleet-bench-")
    model = str(build_model_dir(Path(tmp.name) / "tiny-llama", "llama", tokenizer=train_tokenizer(), seed=0))
    config = ClusterConfig.local(model, num_pages=1024, page_size=16, max_model_len=512).model_copy(
        update={
            "target": TargetConfig(replicas=1, num_cpus=0.5),
            "grpc": GrpcConfig(host="127.0.0.1", port=0, http_port=0),
            "ray": RayConfig(num_cpus=4, dashboard_port=0),
        }
    )
    prompts = _prompts(args.requests, args.seed)
    with ServeCluster(config, progress=lambda m: print(m, file=sys.stderr)) as cluster:
        ttft(cluster.http_url, cluster.grpc_target, prompts[:10])  # warm both paths
        http_s, grpc_s = ttft(cluster.http_url, cluster.grpc_target, prompts)
        http_rps = asyncio.run(http_throughput(cluster.http_url, prompts, args.concurrency, args.duration))
        grpc_rps = asyncio.run(grpc_throughput(cluster.grpc_target, prompts, args.concurrency, args.duration))
    tmp.cleanup()
    h, g = _summary(http_s), _summary(grpc_s)
    report = {
        "model": "tiny random llama (hidden 64, 2 layers), CPU",
        "ttft_http": h,
        "ttft_grpc": g,
        "throughput_http": {**http_rps, "concurrency": args.concurrency},
        "throughput_grpc": {**grpc_rps, "concurrency": args.concurrency},
    }
    print(f"TTFT of 1-token completions, one at a time, HTTP and gRPC alternating ({len(prompts)} each):")
    for name, s in (("HTTP (OpenAI, SSE)", h), ("gRPC", g)):
        print(f"  {name:18} p50 {s['p50_ms']:7.2f} ms   p90 {s['p90_ms']:7.2f} ms   p99 {s['p99_ms']:7.2f} ms")
    for name, t in (("HTTP", http_rps), ("gRPC", grpc_rps)):
        print(
            f"{name}: {t['requests_per_s']:.1f} requests/s with {args.concurrency} in flight, one ingress replica "
            f"({t['requests']} in {t['seconds']:.1f} s, {t['errors']} errors)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
