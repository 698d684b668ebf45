"""`kvfleet bench spec`: what speculative decoding buys, per proposer and k, against no
speculation in the same run.

For each batch size, each proposer (n-gram, the in-process draft) and each k, one engine
generates the same requests (the demo pair by default, greedy unless --temperature) with k fixed;
the same engine with speculation switched off gives the baseline. Reported per row: acceptance
rate a (accepted / proposed), mean tokens per target step per sequence (accepted + 1) beside the
theory (1 - a^(k+1)) / (1 - a) for that a, and the decode speedup (output tokens per second over
the baseline's). Wall times cover whole requests (prompts are short: decode dominates).

    kvfleet bench spec --device cuda --json bench/results/spec-h100.json
    python -m cluster.bench_spec ...      (no Ray needed)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

import torch

from cluster.demo_model import shipped_demo_pair
from workers.config import EngineConfig, SpeculativeConfig
from workers.engine import Engine
from workers.request import GenerateRequest, SamplingParams
from workers.spec_decode import expected_tokens

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "for i in range(10):\n    print(",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
    "import json\n\n\ndef load(path):\n    with open(path) as f:\n",
    "def _check_type(value, expected):\n    if not isinstance(",
    'class Error(Exception):\n    """',
    'def read_lines(filename):\n    """Return',
    "    def __repr__(self):\n        return",
    "import re\n\n_PATTERN = re.compile(",
    "def main():\n    args = ",
    "    def close(self):\n        if self._closed:\n",
    'def quote(s):\n    """',
    "class Queue:\n    def put(self, item):\n",
    "try:\n    import _thread\nexcept ImportError:\n",
]


async def _generate(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    outs = await asyncio.gather(*(engine.complete(GenerateRequest(p, params)) for p in prompts))
    return [o.token_ids for o in outs]


def _timed(engine: Engine, prompts, params, repeats: int) -> tuple[float, list[list[int]]]:
    """The best wall time of `repeats` runs, and the outputs (greedy: the same every run)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = asyncio.run(_generate(engine, prompts, params))
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        best = min(best, time.perf_counter() - start)
    return best, outputs


def _engine(args, speculative: SpeculativeConfig, max_batch: int) -> Engine:
    return Engine(
        EngineConfig(
            model=args.target,
            device=args.device,
            dtype=args.dtype,
            max_num_seqs=max_batch,
            max_model_len=args.max_model_len,
            num_pages=args.num_pages,
            speculative=speculative,
        )
    )


def run_spec_bench(args) -> dict:
    max_batch = max(args.batch_sizes)
    k_max = max(args.ks)
    report: dict = {
        "target": Path(args.target).name,
        "draft": Path(args.draft).name,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu",
        "host": platform.node(),
        "torch": torch.__version__,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "rows": [],
    }
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=0, ignore_eos=True)
    warm = SamplingParams(max_tokens=8, temperature=args.temperature, seed=0, ignore_eos=True)
    for method in args.proposers:
        spec = SpeculativeConfig(
            method=method,
            draft_model=args.draft if method == "draft" else None,
            num_speculative_tokens=k_max,
            adaptive=False,
            max_batch_size=max_batch,
        )
        engine = _engine(args, spec, max_batch)
        decoder = engine.spec
        tok = engine.tokenizer
        for batch in args.batch_sizes:
            prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
            engine.spec = None
            asyncio.run(_generate(engine, prompts, warm))
            base, base_out = _timed(engine, prompts, params, args.repeats)
            base_tps = batch * args.max_tokens / base
            print(f"[{method}] batch {batch:>3}  no speculation      {base_tps:9.1f} tok/s", flush=True)
            for k in args.ks:
                engine.spec = decoder
                decoder.k_max = k
                asyncio.run(_generate(engine, prompts, warm))
                before = engine.stats()
                t, out = _timed(engine, prompts, params, args.repeats)
                after = engine.stats()
                proposed = after.spec_proposed_tokens - before.spec_proposed_tokens
                accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
                steps = after.spec_steps - before.spec_steps
                emitted = after.spec_emitted_tokens - before.spec_emitted_tokens
                a = accepted / proposed if proposed else 0.0
                row = {
                    "proposer": method,
                    "batch": batch,
                    "k": k,
                    "acceptance_rate": round(a, 4),
                    "mean_tokens_per_step": round(emitted / steps, 3) if steps else 0.0,
                    "theory_tokens_per_step": round(expected_tokens(a, k), 3),
                    "tok_per_s": round(batch * args.max_tokens / t, 1),
                    "baseline_tok_per_s": round(base_tps, 1),
                    "speedup": round(base / t, 3),
                    # greedy only: the outputs with and without speculation, token for token
                    "identical_output": out == base_out if args.temperature == 0 else None,
                    "draft_ms_per_call": round(
                        1e3
                        * (after.spec_draft_time_s - before.spec_draft_time_s)
                        / max(1, after.spec_draft_calls - before.spec_draft_calls),
                        3,
                    ),
                }
                report["rows"].append(row)
                print(
                    f"[{method}] batch {batch:>3}  k={k}  a={a:.3f}  tokens/step {row['mean_tokens_per_step']:.2f} "
                    f"(theory {row['theory_tokens_per_step']:.2f})  {row['tok_per_s']:9.1f} tok/s  "
                    f"speedup {row['speedup']:.2f}x  draft {row['draft_ms_per_call']:.2f} ms/call  "
                    f"identical {row['identical_output']}",
                    flush=True,
                )
                if args.json:
                    Path(args.json).write_text(json.dumps(report, indent=2))
        engine.spec = decoder
        asyncio.run(engine.shutdown())
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    target, draft = shipped_demo_pair()
    p.add_argument("--target", default=str(target))
    p.add_argument("--draft", default=str(draft))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--proposers", nargs="+", default=["ngram", "draft"], choices=["ngram", "draft"])
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--num-pages", type=int, default=4096, help="KV pages of the target (and of the draft)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting; the best counts")
    p.add_argument("--json", help="also write the report here")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench_spec", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run_spec_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
