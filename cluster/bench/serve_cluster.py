"""The local cluster each run of `kvfleet bench serve` (and `--tiers`) starts: its engine settings,
its Ray, and the warm-up of its replicas before the measured workload."""

from __future__ import annotations

import math
import sys


def engine_settings(args, **overrides) -> dict:
    """The EngineConfig fields every local cluster of this bench shares (`--tiers` too)."""
    from cluster.bench.shapes import engine_options

    return dict(
        device=args.device,
        max_model_len=args.max_model_len,
        num_pages=args.num_pages,
        max_num_seqs=args.max_num_seqs,
        quantization=getattr(args, "quantization", "none"),
        **engine_options(args.load_format),
        **overrides,
    )


def ray_settings(args):
    """The local Ray: room for every replica's reservation (else Serve waits forever to place
    them) and the ingress."""
    from cluster.config import RayConfig

    return RayConfig(
        num_cpus=max(4, math.ceil(args.replicas * args.worker_cpus) + 2),
        dashboard_port=0,
        include_dashboard=args.dashboard,
    )


def warm(app_name: str, args, vocab_size: int) -> None:
    """Each replica's one-time costs paid before the measurement (cluster/bench/warmup.py)."""
    if not args.warmup:
        return
    from cluster.bench.warmup import warm_up

    extend = args.question_len + args.answer_len
    prompt = max(1, min(args.system_len + args.question_len, args.max_model_len - extend - args.answer_len))
    seconds = warm_up(app_name, vocab_size, prompt, extend, args.answer_len)
    print(f"  warmed every replica up in {seconds:.1f} s", file=sys.stderr, flush=True)
