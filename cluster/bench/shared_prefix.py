"""`kvfleet bench engine --workload shared-prefix`: what prefix caching saves when requests share a long
system prompt.

N requests, each a shared prefix of `--prefix-len` tokens followed by its own suffix (lengths drawn from
`--suffix-len MIN MAX`), outputs from `--min-output/--max-output` (ignore_eos, greedy), seeded token ids.
The same requests run twice in one process: on an engine with prefix caching off, then on one with it on
(one engine at a time, so a GPU holds one copy of the weights). Requests are sent `--concurrency` at a time
(default 1: each request finds the previous ones' pages; with more in flight, the first wave all miss).
Reported per engine: hit rate (cached prompt tokens / prompt tokens, from each request's usage), time to
first token (mean, p50, p90, and the first, cold request alone), output tokens/s, and the engine's own
counters (prefill tokens computed).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.bench.engine import engine_config
from cluster.bench.shapes import resolve_model
from cluster.bench.stats import percentile
from workers.engine import Engine
from workers.request import GenerateRequest, SamplingParams


@dataclass
class SharedPrefixWorkload:
    prefix: list[int]
    suffixes: list[list[int]]
    output_lens: list[int]

    @classmethod
    def make(
        cls,
        num_requests: int,
        prefix_len: int,
        suffix_range: tuple[int, int],
        output_range: tuple[int, int],
        vocab_size: int,
        seed: int,
    ) -> SharedPrefixWorkload:
        rng = random.Random(seed)
        prefix = [rng.randrange(3, vocab_size) for _ in range(prefix_len)]
        suffixes = [
            [rng.randrange(3, vocab_size) for _ in range(rng.randint(*suffix_range))] for _ in range(num_requests)
        ]
        return cls(prefix, suffixes, [rng.randint(*output_range) for _ in range(num_requests)])

    @property
    def prompts(self) -> list[list[int]]:
        return [self.prefix + s for s in self.suffixes]


async def _timed_requests(engine: Engine, prompts: list[list[int]], output_lens: list[int], concurrency: int):
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: list[int], n: int) -> dict:
        async with gate:
            t0 = time.perf_counter()
            ttft, produced, cached = None, 0, 0
            request = GenerateRequest(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
            async for delta in engine.generate(request):
                if ttft is None and delta.token_ids:
                    ttft = time.perf_counter() - t0
                produced += len(delta.token_ids)
                if delta.finish_reason is not None:
                    cached = delta.num_cached_prompt_tokens
            return {"ttft_s": ttft, "output_tokens": produced, "prompt_tokens": len(prompt), "cached": cached}

    return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, output_lens, strict=True)))


def _ms(xs: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(xs) * 1e3,
        "p50": percentile(xs, 0.5) * 1e3,
        "p90": percentile(xs, 0.9) * 1e3,
    }


def bench_shared_prefix(engine: Engine, work: SharedPrefixWorkload, concurrency: int, seed: int) -> dict:
    """One engine on the workload. First a warm-up, two requests sharing another prefix (so the cached
    path, where it is on, has run too: compiled kernels, CUDA graphs), then the cache emptied."""
    warm = SharedPrefixWorkload.make(2, len(work.prefix), (4, 4), (2, 2), engine.model_config.vocab_size, seed + 1)
    asyncio.run(_timed_requests(engine, warm.prompts, warm.output_lens, 1))
    engine.pool.reset_prefix_cache()
    before = engine.stats()
    start = time.perf_counter()
    reqs = asyncio.run(_timed_requests(engine, work.prompts, work.output_lens, concurrency))
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    seconds = time.perf_counter() - start
    after = engine.stats()
    prompt_tokens = sum(r["prompt_tokens"] for r in reqs)
    cached = sum(r["cached"] for r in reqs)
    output_tokens = sum(r["output_tokens"] for r in reqs)
    return {
        "prefix_caching": engine.config.enable_prefix_caching,
        "num_requests": len(reqs),
        "concurrency": concurrency,
        "prompt_tokens": prompt_tokens,
        "cached_prompt_tokens": cached,
        "hit_rate": cached / prompt_tokens,
        "prefill_tokens_computed": after.num_prefill_tokens - before.num_prefill_tokens,
        "ttft_ms": _ms([r["ttft_s"] for r in reqs]),
        "ttft_cold_ms": reqs[0]["ttft_s"] * 1e3,
        "ttft_warm_ms": _ms([r["ttft_s"] for r in reqs[1:]]) if len(reqs) > 1 else None,
        "output_tokens": output_tokens,
        "seconds": seconds,
        "output_tokens_per_s": output_tokens / seconds,
    }


def run_shared_prefix_bench(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = resolve_model(args, Path(args.json or ".").resolve().parent)
    report: dict = {
        "workload": "shared-prefix",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": model,
        "load_format": args.load_format,
        "params": {
            "num_requests": args.num_requests,
            "prefix_len": args.prefix_len,
            "suffix_len": list(args.suffix_len),
            "output_len": [args.min_output, args.max_output],
            "concurrency": args.concurrency,
            "seed": args.seed,
        },
        "runs": [],
        "load_average_start": os.getloadavg(),
    }

    def save() -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))

    for caching in (False, True):
        engine = Engine(engine_config(args, model, device, enable_prefix_caching=caching))
        report["dtype"] = str(next(engine.runner.model.parameters()).dtype)
        work = SharedPrefixWorkload.make(
            args.num_requests,
            args.prefix_len,
            tuple(args.suffix_len),
            (args.min_output, args.max_output),
            engine.model_config.vocab_size,
            args.seed,
        )
        run = bench_shared_prefix(engine, work, args.concurrency, args.seed)
        report["runs"].append(run)
        save()
        print(
            f"prefix caching {'on ' if caching else 'off'}: hit rate {run['hit_rate']:.1%}, "
            f"TTFT ms mean {run['ttft_ms']['mean']:.1f} p50 {run['ttft_ms']['p50']:.1f} "
            f"p90 {run['ttft_ms']['p90']:.1f}, "
            f"{run['output_tokens_per_s']:.1f} output tok/s",
            flush=True,
        )
        asyncio.run(engine.shutdown())
        engine.runner.release()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    off, on = report["runs"]
    report["ttft_p50_speedup"] = off["ttft_ms"]["p50"] / on["ttft_ms"]["p50"]
    report["ttft_mean_speedup"] = off["ttft_ms"]["mean"] / on["ttft_ms"]["mean"]
    report["output_tokens_per_s_ratio"] = on["output_tokens_per_s"] / off["output_tokens_per_s"]
    report["load_average_end"] = os.getloadavg()
    print(
        f"with / without prefix caching: TTFT p50 {report['ttft_p50_speedup']:.2f}x faster, "
        f"output tok/s {report['output_tokens_per_s_ratio']:.2f}x",
        flush=True,
    )
    save()
    return report
