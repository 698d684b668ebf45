"""The `kvfleet` command line.

kvfleet demo                 build (once) a small random-weight model, stream a generation on CPU
kvfleet bench engine ...     the engine against the hardware and transformers on the same workload
kvfleet bench index ...      the Redis page index: lookup latency, publish throughput, memory per entry
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

DEMO_DIR = Path(".cache/kvfleet/demo-model")


def ensure_demo_model(path: Path = DEMO_DIR) -> Path:
    """The demo model directory, built on first use (random weights until a trained pair ships)."""
    if not (path / "config.json").is_file():
        from cluster.demo_model import build_model_dir, train_tokenizer

        print(f"building the demo model in {path} (random weights, once)...", file=sys.stderr)
        build_model_dir(
            path,
            "llama",
            tokenizer=train_tokenizer(vocab_size=2048, max_bytes=400_000),
            seed=0,
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        )
    return path


async def _stream(engine, prompt: str, max_tokens: int, temperature: float, seed: int | None) -> None:
    from workers.request import GenerateRequest, SamplingParams

    ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    request = GenerateRequest(ids, SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed))
    print(prompt, end="", flush=True)
    last = None
    async for delta in engine.generate(request):
        print(delta.text, end="", flush=True)
        last = delta
    print()
    print(
        f"[{last.finish_reason.value}: {last.num_prompt_tokens} prompt tokens, {last.num_completion_tokens} generated]",
        file=sys.stderr,
    )
    await engine.shutdown()


def cmd_demo(args) -> None:
    from workers.config import EngineConfig
    from workers.engine import Engine

    model = Path(args.model) if args.model else ensure_demo_model()
    engine = Engine(EngineConfig(model=str(model), device=args.device))
    asyncio.run(_stream(engine, args.prompt, args.max_tokens, args.temperature, args.seed))


def cmd_bench_engine(args) -> None:
    from cluster.bench import run_engine_bench

    if not args.model and not args.shape:
        args.model = str(ensure_demo_model())
    run_engine_bench(args)


def cmd_bench_index(args) -> None:
    from cluster.bench_index import run_index_bench

    run_index_bench(
        redis_url=args.redis_url,
        pages=tuple(args.pages),
        replicas=tuple(args.replicas),
        iterations=args.iterations,
        publish_pages=args.publish_pages,
        event_pages=args.event_pages,
        seed=args.seed,
        json_path=args.json,
        lookup_modes=tuple(args.lookup_mode),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvfleet", description="Serve LLMs on a GPU cluster.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="stream one generation from the demo model")
    demo.add_argument("--model", help="a Hugging Face model directory (default: the demo model)")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--prompt", default="def fibonacci(n):")
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument("--temperature", type=float, default=0.8)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    eng = bench.add_parser(
        "engine",
        help="engine speed against the hardware and transformers.generate",
        description="GPU example (the issue's targets): kvfleet bench engine --shape llama3-8b --load-format dummy "
        "--num-requests 1000 --min-prompt 128 --max-prompt 2048 --min-output 128 --max-output 512 "
        "--hf-batch-size 64 --json bench/results/engine-h100.json",
    )
    eng.add_argument("--model", help="model directory (default: the demo model)")
    eng.add_argument("--shape", choices=["llama3-8b"], help="a model shape instead of a directory (with dummy)")
    eng.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    eng.add_argument("--device", default="auto")
    eng.add_argument(
        "--parts",
        nargs="+",
        default=["decode", "throughput", "attention"],
        choices=["decode", "throughput", "attention"],
        help="decode and attention run on GPU only",
    )
    eng.add_argument("--num-requests", type=int, default=16)
    eng.add_argument("--min-prompt", type=int, default=32)
    eng.add_argument("--max-prompt", type=int, default=128)
    eng.add_argument("--min-output", type=int, default=64)
    eng.add_argument("--max-output", type=int, default=64)
    eng.add_argument("--seed", type=int, default=0)
    eng.add_argument("--max-num-seqs", type=int, default=256)
    eng.add_argument("--max-num-batched-tokens", type=int, default=8192)
    eng.add_argument("--max-model-len", type=int, default=None)
    eng.add_argument("--enforce-eager", action="store_true")
    eng.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 64, 256])
    eng.add_argument("--decode-context", type=int, default=512, help="context tokens per sequence in decode steps")
    eng.add_argument("--hf-batch-size", type=int, default=16, help="transformers batch size (padded)")
    eng.add_argument("--no-compare", action="store_true", help="skip the transformers run")
    eng.add_argument("--json", help="also write the report here")
    eng.set_defaults(func=cmd_bench_engine)

    idx = bench.add_parser("index", help="Redis page index: lookup latency, publish throughput, memory per entry")
    idx.add_argument("--redis-url", help="an existing Redis (default: a private local server on a free port)")
    idx.add_argument("--pages", type=int, nargs="+", default=[64, 512, 2048], help="prompt lengths, in pages")
    idx.add_argument("--replicas", type=int, nargs="+", default=[8, 64], help="candidate replicas per lookup")
    idx.add_argument("--iterations", type=int, default=300, help="lookups per (layout, pages, replicas) cell")
    idx.add_argument("--publish-pages", type=int, default=200_000, help="pages published in the throughput run")
    idx.add_argument("--event-pages", type=int, default=16, help="pages per KV event in the throughput run")
    idx.add_argument(
        "--lookup-mode",
        nargs="+",
        choices=["search", "exact"],
        default=["search", "exact"],
        help="lookup modes to time (default: both)",
    )
    idx.add_argument("--seed", type=int, default=0)
    idx.add_argument("--json", help="also write the report here")
    idx.set_defaults(func=cmd_bench_index)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args.func(args)


if __name__ == "__main__":
    main()
