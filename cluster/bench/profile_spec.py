"""Where a speculative step's time goes: host time per phase (draft propose and its parts, the
target's forward and verify, the rest of the engine loop) and the device syncs each phase makes.

    python -m cluster.bench.profile_spec --device cuda [--temperature 1] [--batch 1 16] [--k 4]

Per phase: calls, host milliseconds per call (perf_counter around the call, syncs it makes
included) and the device-to-host syncs it triggered (torch.cuda sync-debug warnings, grouped by
the line in workers/ that made them). Device only: on CPU nothing syncs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import time
import traceback
import warnings

import torch

from cluster.bench.spec import PROMPTS, generate_all
from cluster.demo.model import shipped_demo_pair
from workers.config import EngineConfig, SpeculativeConfig
from workers.engine import Engine
from workers.request import SamplingParams

_TIMES: dict[str, list[float]] = collections.defaultdict(list)
_STACK: list[str] = []
_SYNCS: collections.Counter = collections.Counter()


def _timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        _STACK.append(name)
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            _TIMES[name].append(time.perf_counter() - t0)
            _STACK.pop()

    return wrapper


def _on_warning(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" not in str(message):
        return
    site = next(
        (
            f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}"
            for f in reversed(traceback.extract_stack())
            if "/workers/" in f.filename
        ),
        "?",
    )
    _SYNCS[(_STACK[-1] if _STACK else "engine", site)] += 1


def instrument(engine: Engine) -> None:
    from workers.runner import model_runner
    from workers.spec import verify

    runner = engine.runner
    runner.execute = _timed("target.execute", runner.execute)
    runner.forward = _timed("target.forward", runner.forward)
    model_runner.verify = _timed("target.verify", verify.verify)
    spec = engine.spec
    spec.propose = _timed("spec.propose", spec.propose)
    draft = spec.proposer
    if hasattr(draft, "runner"):
        for name in ("_sync", "_catch_up", "_draw", "_advance", "_decode_steps"):
            if hasattr(draft, name):
                setattr(draft, name, _timed(f"draft.{name}", getattr(draft, name)))
        draft.runner.forward = _timed("draft.forward", draft.runner.forward)


def profile(args, method: str, batch: int) -> None:
    target, draft = shipped_demo_pair()
    spec = SpeculativeConfig(
        method=method,
        draft_model=str(draft) if method == "draft" else None,
        num_speculative_tokens=args.k,
        adaptive=False,
        max_batch_size=16,
    )
    engine = Engine(
        EngineConfig(
            model=str(target), device=args.device, max_num_seqs=16, max_model_len=1024, num_pages=4096, speculative=spec
        )
    )
    prompts = [engine.tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=0, ignore_eos=True)
    decoder = engine.spec
    engine.spec = None
    asyncio.run(generate_all(engine, prompts, params))
    t0 = time.perf_counter()
    asyncio.run(generate_all(engine, prompts, params))
    base = time.perf_counter() - t0
    engine.spec = decoder
    asyncio.run(generate_all(engine, prompts, params))  # warm up
    instrument(engine)
    _TIMES.clear()
    _SYNCS.clear()
    before = engine.stats()
    on_gpu = engine.device.type == "cuda"
    if on_gpu:
        torch.cuda.set_sync_debug_mode("warn")
    old = warnings.showwarning
    warnings.showwarning = _on_warning
    warnings.simplefilter("always")
    t0 = time.perf_counter()
    asyncio.run(generate_all(engine, prompts, params))
    wall = time.perf_counter() - t0
    warnings.showwarning = old
    if on_gpu:
        torch.cuda.set_sync_debug_mode(0)
    after = engine.stats()
    steps = len(_TIMES["target.execute"])
    a = (after.spec_accepted_tokens - before.spec_accepted_tokens) / max(
        1, after.spec_proposed_tokens - before.spec_proposed_tokens
    )
    print(
        f"\n== {method} k={args.k} batch {batch} T={args.temperature}: {steps} target steps, "
        f"a={a:.3f}, wall {wall * 1e3:.1f} ms ({wall / max(steps, 1) * 1e3:.3f} ms/step); "
        f"no speculation {base * 1e3:.1f} ms -> speedup {base / wall:.2f}x (timers on)"
    )
    for name, ts in sorted(_TIMES.items()):
        print(f"  {name:22s} {len(ts):5d} calls  {sum(ts) / len(ts) * 1e3:7.3f} ms/call  {sum(ts) * 1e3:8.1f} ms")
    for (phase, site), n in sorted(_SYNCS.items(), key=lambda x: -x[1])[:14]:
        print(f"  sync {n:5d}x ({n / max(steps, 1):.2f}/step) in {phase}: {site}")
    if args.trace and on_gpu:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            asyncio.run(generate_all(engine, prompts, params))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50))
    asyncio.run(engine.shutdown())
    del engine
    if on_gpu:
        torch.cuda.empty_cache()


def launch_costs(args) -> None:
    """Host and device microseconds per call of what a speculative step is made of."""
    from workers.sampling import upload

    target, draft = shipped_demo_pair()
    spec = SpeculativeConfig(method="draft", draft_model=str(draft), num_speculative_tokens=4, adaptive=False)
    engine = Engine(
        EngineConfig(
            model=str(target), device=args.device, max_num_seqs=16, max_model_len=1024, num_pages=4096, speculative=spec
        )
    )
    dev = engine.device
    t_runner, d_runner = engine.runner, engine.spec.proposer.runner
    small = torch.zeros(8, dtype=torch.int64, device=dev)
    logits = torch.randn(1, 8192, device=dev)
    ops = {
        "target graph replay (1 row)": t_runner.graphs[1][0].replay,
        "target graph replay (8 rows)": t_runner.graphs[8][0].replay,
        "draft graph replay (1 row)": d_runner.graphs[1][0].replay,
        "copy_ device->device (8 ints)": lambda: t_runner.buffers.positions[:8].copy_(small),
        "argmax [1, 8192]": lambda: logits.argmax(dim=-1),
        "upload 8 ints (pinned, non-blocking)": lambda: upload(list(range(8)), torch.int64, dev),
        "pageable H2D non_blocking (8 ints)": lambda: small.copy_(torch.tensor(list(range(8))), non_blocking=True),
        "torch.tensor(8 ints, device=cuda)": lambda: torch.tensor(list(range(8)), device=dev),
        ".tolist() of 8 ints": lambda: small.tolist(),
    }
    print("\n== launch costs: host us per call, device us per call (100 back to back)")
    for name, fn in ops.items():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(100):
            fn()
        host = (time.perf_counter() - t0) * 1e4
        end.record()
        torch.cuda.synchronize()
        print(f"  {name:40s} host {host:8.1f} us   device {start.elapsed_time(end) * 10:8.1f} us")
    asyncio.run(engine.shutdown())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m cluster.bench.profile_spec", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--proposers", nargs="+", default=["draft"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--trace", action="store_true", help="also a torch.profiler table (batch 1 runs)")
    p.add_argument("--launch-costs", action="store_true", help="also time the pieces of a step, one by one")
    args = p.parse_args(argv)
    if args.launch_costs:
        launch_costs(args)
    for method in args.proposers:
        for batch in args.batch:
            profile(args, method, batch)


if __name__ == "__main__":
    main()
