"""The `kvfleet` command line.

kvfleet serve [cluster.yaml] run a cluster (no file: local mode: local Ray, private Redis, the default
                             model SmolLM2-135M-Instruct on CPU, gRPC on 127.0.0.1:50051) until Ctrl-C
kvfleet demo                 local mode, one streamed chat answer through the gRPC API, then shut down
kvfleet generate "prompt"    a gRPC client: stream a generation from a running cluster
kvfleet status               a running cluster's replicas: load, KV pages, prefix-cache hit rates
kvfleet bench engine ...     the engine against the hardware and transformers on the same workload
kvfleet bench api ...        the Ray Serve + gRPC path against the engine in-process (added TTFT, requests/s)
kvfleet bench serve ...      prefix-sharing conversations through the gRPC API, per routing policy (--compare)
kvfleet bench simulate ...   the routing policy in a discrete-event simulation of 8 to 1,024 replicas
kvfleet bench index ...      the Redis page index: lookup latency, publish throughput, memory per entry
kvfleet bench quant-kernels  int4/int8/fp8 matmul kernels against bf16 on Llama-3-8B shapes (GPU)
kvfleet bench cpu-quant-kernels  the AVX2 int8/int4 CPU kernel against aten's at SmolLM2-135M's shapes
kvfleet bench quality ...    perplexity, top-1 agreement and KL per quantization scheme on held-out text
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def demo_model() -> Path:
    """The default model: SmolLM2-135M-Instruct's GGUF file, installed by `make install`."""
    from cluster.default_model import ModelNotInstalledError, default_model_path

    try:
        return default_model_path()
    except ModelNotInstalledError as e:
        raise SystemExit(str(e)) from None


def _cluster_config(args):
    from cluster.config import ClusterConfig

    if args.config:
        config = ClusterConfig.from_yaml(args.config)
    else:
        if args.model:
            config = ClusterConfig.local(Path(args.model), device=args.device)
        else:
            from cluster.default_model import MODEL_ID

            config = ClusterConfig.local(demo_model(), device=args.device, model_id=MODEL_ID)
    updates = {}
    if args.replicas is not None:
        updates["target"] = config.target.model_copy(update={"replicas": args.replicas})
    if args.port is not None:
        updates["grpc"] = config.grpc.model_copy(update={"port": args.port})
    return config.model_copy(update=updates) if updates else config


def cmd_serve(args) -> None:
    import signal
    import threading

    from cluster.local import ServeCluster

    config = _cluster_config(args)
    stop = threading.Event()
    cluster = ServeCluster(config)
    try:
        cluster.start()
        # Installed after Ray's own handlers (ray.init replaces SIGTERM's): both signals end the
        # wait below and the cluster stops in order, also where SIGINT was ignored at start (a
        # background job), so Python would raise no KeyboardInterrupt.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        print(f"gRPC API     {cluster.grpc_target}   (kvfleet.v1.Generation; try: kvfleet generate --chat 'Hi!')")
        print(f"HTTP API     {cluster.http_url}   (OpenAI-compatible: /completions, /chat/completions, /models)")
        if cluster.dashboard_url:
            print(f"dashboard    {cluster.dashboard_url}   (metrics: ray_kvfleet_*)")
        print(f"page index   {cluster.config.index.redis_url}")
        print(f"model        {config.model_id} ({config.target.replicas} replica(s) on {config.engine.device})")
        print("Ctrl-C stops everything.", flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("shutting down...", file=sys.stderr, flush=True)
        cluster.stop()


def cmd_demo(args) -> None:
    """Local mode end to end: start the cluster, stream one generation through gRPC, shut down."""
    from cluster.client import KvfleetClient
    from cluster.local import ServeCluster

    config = _cluster_config(args)
    with ServeCluster(config) as cluster:
        print(f"gRPC API at {cluster.grpc_target}; streaming a generation:", file=sys.stderr, flush=True)
        with KvfleetClient(cluster.grpc_target) as client:
            # A chat model answers the prompt as a user turn (its chat template renders it); --raw
            # sends it as plain text to continue (a model without a template, e.g. kvfleet-pycoder).
            prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
            print(args.prompt if args.raw else f"> {args.prompt}\n", end="", flush=True)
            last = None
            for chunk in client.generate(
                prompt, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
            ):
                print(chunk.text, end="", flush=True)
                last = chunk
            print()
        usage = last.usage
        print(
            f"[{last.finish_reason}: {usage.prompt_tokens} prompt tokens, {usage.completion_tokens} generated, "
            f"served by replica {last.replica}]",
            file=sys.stderr,
        )


def cmd_quantize(args) -> None:
    from workers.quant.convert import quantize_checkpoint

    summary = quantize_checkpoint(args.src, args.dst, args.scheme, args.group_size)
    calib = summary.get("awq") or {}
    extra = ""
    if "mean_mse_ratio" in calib:
        extra = f"; AWQ error / RTN error {calib['mean_mse_ratio']:.3f}"
    elif "mean_err_ratio" in calib:
        extra = f"; calibrated weight error / RTN error {calib['mean_err_ratio']:.3f}"
    print(f"wrote {args.scheme} (group {args.group_size}) to {summary['dst']}{extra}")


def cmd_bench_quant(args) -> None:
    from cluster.bench.quant import run_quant_bench

    if not args.model:
        args.model = str(demo_model())
    run_quant_bench(args)


def cmd_bench_engine(args) -> None:
    from cluster.bench.engine import run_engine_bench
    from cluster.bench.shared_prefix import run_shared_prefix_bench

    if not args.model and not args.shape:
        args.model = str(demo_model())
    (run_shared_prefix_bench if args.workload == "shared-prefix" else run_engine_bench)(args)


def cmd_bench_spec(args) -> None:
    from cluster.bench.spec import run_spec_bench

    run_spec_bench(args)


def cmd_bench_api(args) -> None:
    from cluster.bench.api import run_api_bench

    run_api_bench(args)


def cmd_bench_quant_kernels(args) -> None:
    from cluster.bench.quant_kernels import main as run_quant_kernels_bench

    run_quant_kernels_bench(args)


def cmd_bench_cpu_quant_kernels(args) -> None:
    from cluster.bench.cpu_quant_kernels import main as run_cpu_quant_kernels_bench

    run_cpu_quant_kernels_bench(args)


def cmd_bench_index(args) -> None:
    from cluster.bench.index import run_index_bench

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

    def cluster_options(p):
        p.add_argument("config", nargs="?", help="cluster YAML (default: local mode with the demo model)")
        p.add_argument(
            "--model", help="local mode: a Hugging Face model directory or GGUF file (default: SmolLM2-135M-Instruct)"
        )
        p.add_argument("--device", default="cpu", help="local mode: cpu, cuda or auto")
        p.add_argument("--replicas", type=int, help="TargetWorker replicas (overrides the config)")
        p.add_argument("--port", type=int, help="gRPC port (overrides the config; default 50051)")

    serve = sub.add_parser("serve", help="run a cluster until Ctrl-C (no config: local mode)")
    cluster_options(serve)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="local mode: stream one generation through the gRPC API, then stop")
    cluster_options(demo)
    demo.add_argument("--prompt", default="Why is the sky blue? Answer in two sentences.")
    demo.add_argument("--raw", action="store_true", help="send the prompt as text to continue, not as a chat turn")
    demo.add_argument("--max-tokens", type=int, default=96)
    demo.add_argument("--temperature", type=float, default=0.7)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    from cluster.client_cli import add_client_commands

    add_client_commands(sub)

    quant = sub.add_parser(
        "quantize",
        help="write a quantized copy of a Hugging Face model directory (loads again without recalibration)",
    )
    quant.add_argument("src", help="a float Hugging Face model directory")
    quant.add_argument("dst", help="the directory to write")
    quant.add_argument("--scheme", required=True, choices=["int4", "int4-awq", "int8", "fp8", "fp8-gptq"])
    quant.add_argument("--group-size", type=int, default=128, help="input columns per scale (int4, int8)")
    quant.set_defaults(func=cmd_quantize)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    eng = bench.add_parser(
        "engine",
        help="engine speed against the hardware and transformers.generate",
        description="GPU example (the issue's targets): kvfleet bench engine --shape llama3-8b --load-format dummy "
        "--num-requests 1000 --min-prompt 128 --max-prompt 2048 --min-output 128 --max-output 512 "
        "--hf-batch-size 64 --json bench/results/engine-h100.json",
    )
    eng.add_argument("--model", help="model directory or GGUF file (default: SmolLM2-135M-Instruct)")
    from cluster.bench.shapes import add_shape_arguments

    add_shape_arguments(eng)
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
    eng.add_argument(
        "--workload",
        choices=["random", "shared-prefix"],
        default="random",
        help="shared-prefix: requests sharing a long system prompt, prefix caching off vs on (TTFT, hit rate)",
    )
    eng.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: tokens of the shared prompt")
    eng.add_argument("--suffix-len", type=int, nargs=2, default=[16, 64], metavar=("MIN", "MAX"))
    eng.add_argument("--concurrency", type=int, default=1, help="shared-prefix: requests in flight")
    eng.add_argument(
        "--quantization",
        default="none",
        choices=["none", "fp8", "fp8-gptq", "int8", "int4", "int4-awq", "gguf", "compressed-tensors"],
    )
    eng.add_argument("--quantization-group-size", type=int, default=128)
    eng.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="fp8: E4M3 KV pages")
    eng.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="the model's dtype (engine default: auto)"
    )
    eng.set_defaults(func=cmd_bench_engine)

    from cluster.bench.realmodel import add_realmodel_parser

    add_realmodel_parser(bench, eng)

    qb = bench.add_parser("quant", help="output tokens/s per quantization scheme (one engine per scheme)")
    from cluster.bench.quant import add_arguments as add_quant_arguments

    add_quant_arguments(qb)
    qb.set_defaults(func=cmd_bench_quant)

    from cluster.bench.spec import add_arguments as add_spec_arguments

    spec = bench.add_parser(
        "spec",
        help="speculative decoding: acceptance, tokens per step vs theory, speedup per proposer and k",
        description="kvfleet bench spec --device cuda --json bench/results/spec-h100.json",
    )
    add_spec_arguments(spec)
    spec.set_defaults(func=cmd_bench_spec)

    api = bench.add_parser(
        "api",
        help="the Ray Serve + gRPC path against the engine in-process: added TTFT, requests/s",
        description="Starts a local cluster; default model: a tiny random Llama (the path's cost shows).",
    )
    api.add_argument("--model", help="model directory (default: a tiny random Llama built in a temp dir)")
    api.add_argument("--device", default="cpu")
    api.add_argument("--num-requests", type=int, default=200, help="1-token requests timed one at a time")
    api.add_argument("--concurrency", type=int, default=32, help="streams in flight in the throughput run")
    api.add_argument("--duration", type=float, default=20.0, help="seconds of the throughput run")
    api.add_argument("--replicas", type=int, default=1, help="TargetWorker replicas")
    api.add_argument("--seed", type=int, default=0)
    api.add_argument("--json", help="also write the report here")
    api.set_defaults(func=cmd_bench_api)

    from cluster.bench.serve import add_serve_parser
    from cluster.bench.simulate import add_simulate_parser

    add_serve_parser(bench)
    add_simulate_parser(bench)

    from cluster.bench.quant_kernels import add_arguments as add_quant_kernels_arguments

    qk = bench.add_parser(
        "quant-kernels",
        help="int4/int8/fp8 matmul kernels against bf16 on Llama-3-8B layer shapes (GPU)",
        description="kvfleet bench quant-kernels --json bench/results/quant-kernels-h200.json",
    )
    add_quant_kernels_arguments(qk)
    qk.set_defaults(func=cmd_bench_quant_kernels)
    from cluster.bench.cpu_quant_kernels import add_arguments as add_cpu_quant_kernels_arguments

    cqk = bench.add_parser(
        "cpu-quant-kernels",
        help="the AVX2 int8/int4 CPU kernel against aten's at SmolLM2-135M's shapes, alternating",
        description="kvfleet bench cpu-quant-kernels --json bench/results/cpu-quant-kernel-cpu.json",
    )
    add_cpu_quant_kernels_arguments(cqk)
    cqk.set_defaults(func=cmd_bench_cpu_quant_kernels)
    from cluster.bench.quality import add_quality_parser

    add_quality_parser(bench)

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
