"""The quantized matmul kernels (workers/kernels/triton_quant.py) against bf16 `F.linear` on the
Llama-3-8B layer shapes, and what they imply for a 32-layer decode step.

    kvfleet bench quant-kernels --json bench/results/quant-kernels-h200.json [--sweep]

Each (layer, M, scheme) point replays a CUDA graph of calls that cycle through enough copies of
the weight to be several times the L2 (so every call streams its weights from HBM, as in a real
decode step, where 32 layers' weights never fit L2) and reports microseconds per call, the weight
bytes per second achieved and, for reference, a device-to-device copy's bandwidth. fp8 is timed
both ways: weight-only Triton (`fp8-wo`) and W8A8 `torch._scaled_mm` with per-token activation
scales (`fp8-mm`); `fp8` is what `fp8_matmul` picks at that M. The per-token estimate sums the
matmul times of one decode step (32 x (qkv + o + gate_up + down) + lm_head), nothing else
(attention, norms, sampling are the same for every scheme). `--sweep` times candidate tile
configs at the decode sizes and reports the best beside the picked one.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
import torch.nn.functional as F

from workers.kernels import quant_reference as ref
from workers.kernels import triton_quant as tq
from workers.kernels.triton_gemv import pick_gemv_config

SHAPES = {  # name: (K in, N out), Llama-3-8B
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
    "lm_head": (4096, 128256),
}
NUM_LAYERS = 32
SCHEMES = ["bf16", "int4", "int8", "fp8-wo", "fp8-mm"]


def _prepare(scheme: str, w: torch.Tensor, group_size: int):
    """(prepared tensors, the call, weight bytes)."""
    if scheme == "bf16":
        return (w,), lambda x, w: F.linear(x, w), w.numel() * 2
    if scheme == "int4":
        q = ref.quantize_int4(w, group_size)
        p = tq.prepare_int4(*q)
        return p, tq.int4_matmul, sum(t.numel() * t.element_size() for t in q)
    if scheme == "int8":
        q = ref.quantize_int8(w, group_size)
        p = tq.prepare_int8(*q)
        return p, tq.int8_matmul, sum(t.numel() * t.element_size() for t in q)
    q = ref.quantize_fp8(w)
    p = tq.prepare_fp8(*q)
    nbytes = sum(t.numel() * t.element_size() for t in q)
    return p, (lambda x, *a, **kw: tq.fp8_matmul(x, *a, scaled_mm=scheme == "fp8-mm", **kw)), nbytes


def _time_calls(calls, reps: int = 3) -> float:
    """Seconds per call: a CUDA graph replaying `calls` (one per weight copy), `reps` times."""
    for c in calls:  # compile and warm up outside the capture
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (reps * len(calls))


def _copies(nbytes: int, l2_bytes: int) -> int:
    return max(2, min(32, math.ceil(4 * l2_bytes / nbytes)))


def copy_bandwidth() -> float:
    """Bytes per second read + written by a 2 GiB device-to-device copy."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    seconds = _time_calls([lambda: b.copy_(a)] * 4)
    return 2 * a.numel() / seconds


def _setup(scheme, k, n, m, group_size, l2_bytes):
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    prepared, fn, nbytes = _prepare(scheme, w, group_size)
    del w
    copies = [prepared] + [tuple(t.clone() for t in prepared) for _ in range(_copies(nbytes, l2_bytes) - 1)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    return copies, fn, nbytes, x


def _measure(copies, fn, nbytes, x, n, k, config=None) -> dict:
    kw = {"config": config} if config is not None else {}
    seconds = _time_calls([lambda p=p: fn(x, *p, **kw) for p in copies])
    m = x.shape[0]
    return {"us": seconds * 1e6, "weight_GBps": nbytes / seconds / 1e9, "TFLOPs": 2 * m * n * k / seconds / 1e12}


def bench_point(scheme, k, n, m, group_size, l2_bytes) -> dict:
    copies, fn, nbytes, x = _setup(scheme, k, n, m, group_size, l2_bytes)
    try:
        return _measure(copies, fn, nbytes, x, n, k)
    except Exception as e:  # a scheme that cannot run this shape: say so, go on
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    finally:
        del copies
        torch.cuda.empty_cache()


def _candidates(m: int, k: int):
    """Tile shapes x splits of K; the split is a runtime argument (no recompile). One row also tries
    the GEMV kernel's column blocks x K tiles x warps (triton_gemv.pick_gemv_config's table)."""
    bm = 16 if m <= 16 else 64
    for bn, warps, stages in ((32, 4, 4), (64, 4, 4), (64, 4, 3), (128, 4, 4), (128, 8, 4)):
        for split in (1, 2, 4, 8, 16):
            yield tq.MatmulConfig(bm, bn, 128, split, warps, stages)
    if m == 1:
        for bn in (8, 16, 32):
            for bk in (256, 512, 1024, 2048):
                for warps in (4, 8):
                    for split in (1, 2, 4, 8, 16):
                        if k % bk == 0 and split <= k // bk:
                            yield tq.GemvConfig(bn, bk, split, warps)


def run(args) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("kvfleet bench quant-kernels needs a GPU")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    report = {
        "device": props.name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "group_size": args.group_size,
        "l2_bytes": l2,
        "copy_bandwidth_GBps": copy_bandwidth() / 1e9,
        "method": "CUDA graph of calls over rotating weight copies (>= 4x L2), CUDA events",
        "points": [],
    }
    print(f"{props.name}: copy bandwidth {report['copy_bandwidth_GBps']:.0f} GB/s (read + write)")
    t0 = time.time()
    for name in args.layers:
        k, n = SHAPES[name]
        for m in args.m:
            for scheme in args.schemes:
                if scheme == "fp8-mm" and not tq.has_fp8_tensor_cores(torch.device("cuda")):
                    continue
                r = bench_point(scheme, k, n, m, args.group_size, l2)
                report["points"].append({"layer": name, "K": k, "N": n, "M": m, "scheme": scheme, **r})
                if "error" in r:
                    print(f"{name:8s} M={m:4d} {scheme:7s} {r['error']}", flush=True)
                    continue
                print(
                    f"{name:8s} M={m:4d} {scheme:7s} {r['us']:9.1f} us {r['weight_GBps']:7.0f} GB/s "
                    f"{r['TFLOPs']:6.1f} TFLOP/s",
                    flush=True,
                )
    report["estimates"] = _estimates(report["points"], args.m)
    for m, est in report["estimates"].items():
        print(
            f"M={m}: matmul ms per decode step "
            + ", ".join(f"{s} {v['ms']:.2f} ({v['speedup']:.2f}x)" for s, v in est.items())
        )
    report["seconds"] = time.time() - t0
    return report


def _estimates(points, ms) -> dict:
    """Per M: the matmul time of one 32-layer decode step per scheme, and its speedup over bf16."""
    out = {}
    for m in ms:
        times = {}
        for p in points:
            if p["M"] != m or "error" in p:
                continue
            times.setdefault(p["scheme"], {})[p["layer"]] = p["us"]
        if "fp8-wo" in times and "fp8-mm" in times:
            times["fp8"] = times["fp8-mm"] if m >= tq.FP8_SCALED_MM_MIN_M else times["fp8-wo"]
        est = {}
        for scheme, t in times.items():
            if set(t) != set(SHAPES):
                continue
            us = NUM_LAYERS * (t["qkv"] + t["o"] + t["gate_up"] + t["down"]) + t["lm_head"]
            est[scheme] = {"ms": us / 1e3}
        if "bf16" in est:
            for v in est.values():
                v["speedup"] = est["bf16"]["ms"] / v["ms"]
        out[m] = est
    return out


def _sweep(args, l2) -> list[dict]:
    rows = []
    for name in args.sweep_layers:
        k, n = SHAPES[name]
        for m in [m for m in args.m if m <= 64]:
            for scheme in ("int4", "int8", "fp8-wo"):
                copies, fn, nbytes, x = _setup(scheme, k, n, m, args.group_size, l2)
                results = []
                for cfg in _candidates(m, k):
                    try:
                        results.append((_measure(copies, fn, nbytes, x, n, k, cfg), cfg))
                    except Exception as e:  # out of resources for a tile: skip it
                        print(f"skip {cfg}: {type(e).__name__}")
                if m == 1:  # one row goes to the GEMV kernel
                    kind = {"int4": 0, "int8": 1, "fp8-wo": 2}[scheme]
                    unit = min(args.group_size, 128) if kind < 2 else 1
                    picked = pick_gemv_config(n, k, kind, unit, torch.device("cuda"))
                else:
                    picked = tq.pick_config(m, n, k, 128, torch.device("cuda"), int4=scheme == "int4")
                r, cfg = min(results, key=lambda rc: rc[0]["us"])
                picked_r = _measure(copies, fn, nbytes, x, n, k)
                rows.append(
                    {
                        "layer": name,
                        "M": m,
                        "scheme": scheme,
                        "best": {"kernel": type(cfg).__name__, **vars(cfg)},
                        **r,
                        "picked": {"kernel": type(picked).__name__, **vars(picked)},
                        "picked_us": picked_r["us"],
                    }
                )
                print(
                    f"sweep {name} M={m} {scheme}: best {cfg} {r['us']:.1f} us {r['weight_GBps']:.0f} GB/s; "
                    f"picked {picked_r['us']:.1f} us",
                    flush=True,
                )
                del copies
                torch.cuda.empty_cache()
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 512], help="rows (batch tokens)")
    p.add_argument("--schemes", nargs="+", choices=SCHEMES, default=SCHEMES)
    p.add_argument("--group-size", type=int, default=128, help="int4/int8 scale group")
    p.add_argument("--sweep", action="store_true", help="also time candidate tile configs at M <= 64")
    p.add_argument("--sweep-layers", nargs="+", choices=list(SHAPES), default=["o", "gate_up", "down"])
    p.add_argument("--json", help="also write the report here")


def main(args) -> None:
    report = run(args)
    _write(report, args.json)
    if args.sweep:  # after the main figures are safe on disk
        report["sweep"] = _sweep(args, report["l2_bytes"])
        _write(report, args.json)


def _write(report: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    main(parser.parse_args())
