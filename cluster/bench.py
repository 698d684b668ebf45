"""`kvfleet bench engine`: the engine against `transformers.generate` on the same weights,
the same seeded workload, in the same process.

The workload: `num_requests` prompts of seeded random lengths, `output_len` tokens each
(ignore_eos, greedy), all submitted at once. The engine serves them with continuous batching;
transformers runs them as padded batches of up to `hf_batch_size`. Both are warmed up first.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from workers.config import EngineConfig
from workers.engine import Engine
from workers.request import GenerateRequest, SamplingParams


@dataclass
class BenchResult:
    system: str
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    seconds: float

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds


def make_workload(num_requests: int, min_prompt: int, max_prompt: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # ids 3.. skip the special tokens of the demo tokenizer
    return [
        [rng.randrange(3, vocab_size) for _ in range(rng.randint(min_prompt, max_prompt))] for _ in range(num_requests)
    ]


async def _engine_run(engine: Engine, prompts: list[list[int]], output_len: int) -> int:
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    outs = await asyncio.gather(*(engine.complete(GenerateRequest(p, params)) for p in prompts))
    return sum(len(o.token_ids) for o in outs)


def bench_engine(engine: Engine, prompts: list[list[int]], output_len: int) -> BenchResult:
    asyncio.run(_engine_run(engine, prompts[:2], 4))  # warm-up
    start = time.perf_counter()
    produced = asyncio.run(_engine_run(engine, prompts, output_len))
    _sync(engine.device)
    return BenchResult("kvfleet", len(prompts), sum(map(len, prompts)), produced, time.perf_counter() - start)


def bench_transformers(
    model_dir: str,
    prompts: list[list[int]],
    output_len: int,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    pad_id: int,
) -> BenchResult:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    def run(batch: list[list[int]], n: int) -> int:
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad_id,
            )
        return (out.shape[1] - width) * len(batch)

    run(prompts[:2], 4)  # warm-up
    start = time.perf_counter()
    produced = sum(run(prompts[i : i + batch_size], output_len) for i in range(0, len(prompts), batch_size))
    _sync(device)
    return BenchResult("transformers", len(prompts), sum(map(len, prompts)), produced, time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine_bench(
    model: str,
    device: str,
    num_requests: int,
    min_prompt: int,
    max_prompt: int,
    output_len: int,
    seed: int,
    hf_batch_size: int,
    compare: bool,
    json_path: str | None,
) -> dict:
    engine = Engine(EngineConfig(model=model, device=device, max_num_seqs=max(num_requests, 1)))
    prompts = make_workload(num_requests, min_prompt, max_prompt, engine.model_config.vocab_size, seed)
    results = [bench_engine(engine, prompts, output_len)]
    if compare:
        pad = engine.tokenizer.pad_token_id
        pad = pad if pad is not None else engine.tokenizer.eos_token_id
        dtype = next(engine.runner.model.parameters()).dtype
        results.append(bench_transformers(model, prompts, output_len, engine.device, dtype, hf_batch_size, pad))
    report = {
        "device": str(engine.device),
        "device_name": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "model": model,
        "workload": {
            "num_requests": num_requests,
            "prompt_len": [min_prompt, max_prompt],
            "output_len": output_len,
            "seed": seed,
        },
        "results": [
            asdict(r) | {"output_tokens_per_s": r.output_tokens_per_s, "total_tokens_per_s": r.total_tokens_per_s}
            for r in results
        ],
    }
    if compare:
        report["speedup_output_tokens_per_s"] = results[0].output_tokens_per_s / results[1].output_tokens_per_s
    print(f"{'system':<14}{'requests':>9}{'out tok':>9}{'seconds':>9}{'out tok/s':>11}{'total tok/s':>13}")
    for r in results:
        print(
            f"{r.system:<14}{r.num_requests:>9}{r.output_tokens:>9}{r.seconds:>9.2f}"
            f"{r.output_tokens_per_s:>11.1f}{r.total_tokens_per_s:>13.1f}"
        )
    if compare:
        print(f"kvfleet / transformers output tokens/s: {report['speedup_output_tokens_per_s']:.2f}x")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report
