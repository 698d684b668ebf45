"""The `kvfleet` command line.

kvfleet demo                 build (once) a small random-weight model, stream a generation on CPU
kvfleet bench engine ...     the engine against transformers on the same weights and workload
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

    model = args.model or str(ensure_demo_model())
    run_engine_bench(
        model,
        args.device,
        args.num_requests,
        args.min_prompt,
        args.max_prompt,
        args.output_len,
        args.seed,
        args.hf_batch_size,
        not args.no_compare,
        args.json,
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
    eng = bench.add_parser("engine", help="engine throughput against transformers.generate")
    eng.add_argument("--model", help="model directory (default: the demo model)")
    eng.add_argument("--device", default="auto")
    eng.add_argument("--num-requests", type=int, default=16)
    eng.add_argument("--min-prompt", type=int, default=32)
    eng.add_argument("--max-prompt", type=int, default=128)
    eng.add_argument("--output-len", type=int, default=64)
    eng.add_argument("--seed", type=int, default=0)
    eng.add_argument("--hf-batch-size", type=int, default=16, help="transformers batch size (padded)")
    eng.add_argument("--no-compare", action="store_true", help="skip the transformers run")
    eng.add_argument("--json", help="also write the report here")
    eng.set_defaults(func=cmd_bench_engine)
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
