"""`kvfleet bench quant`: the engine's output tokens/s per quantization scheme on one device, the
same workload as `kvfleet bench engine`'s throughput part (random prompts, fixed output length),
at several request counts, one engine (one load) per scheme. CPU figures: the issue's 2-core
comparison with llama.cpp (batch 1) and transformers (16 requests)."""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import torch

from cluster.bench.engine import Workload, bench_engine_throughput
from workers.config import EngineConfig
from workers.engine import Engine


def run_quant_bench(args) -> dict:
    report: dict = {
        "model": args.model,
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    report["runs"] = runs = []
    for scheme in args.schemes:
        group = args.int4_group_size if scheme.startswith("int4") else 128
        start = time.perf_counter()
        engine = Engine(
            EngineConfig(model=args.model, device=args.device, max_model_len=args.max_model_len,
                         quantization=scheme, quantization_group_size=group)
        )  # fmt: skip
        load_s = time.perf_counter() - start
        for n in args.num_requests:
            work = Workload.make(n, (args.min_prompt, args.max_prompt), (args.output, args.output),
                                 engine.model_config.vocab_size, args.seed)  # fmt: skip
            load_before = os.getloadavg()[0]
            r = bench_engine_throughput(engine, work)
            row = r.row() | {"scheme": scheme, "group_size": group if scheme != "none" else None, "load_s": load_s,
                             "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0]}  # fmt: skip
            runs.append(row)
            print(f"{scheme:<8} {n:>3} requests: {r.output_tokens_per_s:7.1f} output tok/s "
                  f"(load avg {load_before:.1f} -> {row['loadavg_1m_after']:.1f})", flush=True)  # fmt: skip
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        engine.runner.release()
        del engine
        gc.collect()
    return report


def add_arguments(p) -> None:
    p.add_argument("--model", help="model directory or GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--schemes", nargs="+", default=["none", "gguf", "int8", "int4"])
    p.add_argument("--int4-group-size", type=int, default=64, help="SmolLM2's 576 columns: 64 or 32")
    p.add_argument("--num-requests", type=int, nargs="+", default=[1, 16])
    p.add_argument("--min-prompt", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--output", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the report here")
