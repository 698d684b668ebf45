"""The CPU weight-only matmuls at SmolLM2-135M's shapes: the avx2 kernel (workers/kernels/cpu_quant.cpp)
against aten's, alternating A/B so that the other load of a shared machine falls on both alike.

    kvfleet bench cpu-quant-kernels --json bench/results/cpu-quant-kernel-cpu.json

Each figure is the median of `--rounds` rounds, each the mean of `--calls` calls back to back; GB/s
counts the weight bytes the kernel streams (codes and scales), not x or y.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from workers.quant.backends import get_backend
from workers.quant.layout import quantize_rtn

# (name, N, K): q/k/v and o projections, gate/up, down, and the tied-embedding logits head
SHAPES = [("o_proj", 576, 576), ("k_proj", 192, 576), ("gate_proj", 1536, 576), ("down_proj", 576, 1536),
          ("qkv_proj", 960, 576), ("gate_up_proj", 3072, 576), ("logits_head", 49152, 576)]  # fmt: skip
SCHEMES = [("int8", None), ("int4", 64), ("int4", 32)]


def _weight_bytes(prepared) -> int:
    return sum(t.numel() * t.element_size() for t in prepared if isinstance(t, torch.Tensor))


def _time(fn, calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16], help="rows of x (decode batch sizes)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; each figure is their median")
    p.add_argument("--calls", type=int, default=20, help="calls back to back per round")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", help="write the report here")


def main(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    report = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": f"{_cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}, "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads",
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
        "loadavg_before": os.getloadavg(),
        "rows": [],
    }
    torch.manual_seed(0)
    for kind, group in SCHEMES:
        for name, n, k in SHAPES:
            if kind == "int4" and name == "logits_head":
                continue  # the head is int8 in every CPU scheme
            w = quantize_rtn(torch.randn(n, k), kind, group or k)
            backends = {b: get_backend(kind, cpu, b) for b in ("avx2", "aten")}
            prepared = {b: be.prepare(w) for b, be in backends.items()}
            for m in args.rows:
                x = torch.randn(m, k)
                times = {b: [] for b in backends}
                for _ in range(args.rounds):
                    for b, be in backends.items():
                        times[b].append(_time(lambda be=be, p=prepared[b], x=x: be.matmul(x, *p), args.calls))
                row = {"scheme": kind, "group_size": group or k, "shape": name, "n": n, "k": k, "m": m}
                for b in backends:
                    t = statistics.median(times[b])
                    row[f"{b}_ms"] = round(t * 1e3, 4)
                    row[f"{b}_weight_gbps"] = round(_weight_bytes(prepared[b]) / t / 1e9, 2)
                row["speedup"] = round(row["aten_ms"] / row["avx2_ms"], 2)
                report["rows"].append(row)
                print(f"{kind}/{group or k:<4} {name:<13} M={m:<3} avx2 {row['avx2_ms']:8.3f} ms "
                      f"({row['avx2_weight_gbps']:5.1f} GB/s)  aten {row['aten_ms']:8.3f} ms "
                      f"({row['aten_weight_gbps']:5.1f} GB/s)  x{row['speedup']}", flush=True)  # fmt: skip
    report["loadavg_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
