"""`kvfleet bench engine`: the engine against the hardware and against `transformers`.

Everything is measured in one process, on one device, in one run:
- `throughput`: a seeded workload (prompt and output lengths drawn from ranges, ignore_eos,
  greedy), all requests submitted at once to the engine, then the same requests through
  `transformers.generate` in padded batches (static KV cache on GPU); output and total tokens/s.
- `decode` (GPU): the time of one decode step at several batch sizes, and the fraction of the
  device's memory bandwidth it implies: (weights + KV bytes read per step) / step time /
  bandwidth measured by a device-to-device copy in the same run.
- `attention` (GPU): paged decode attention's achieved bandwidth on two shapes, beside
  `scaled_dot_product_attention` over the same K/V laid out contiguously.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cluster.bench.shapes import engine_options, resolve_model
from workers.config import EngineConfig
from workers.engine import Engine
from workers.request import GenerateRequest, SamplingParams
from workers.scheduler import ScheduledSeq, SchedulerOutput
from workers.sequence import Sequence


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @classmethod
    def make(
        cls, num_requests: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab_size: int, seed: int
    ) -> Workload:
        rng = random.Random(seed)
        prompts = [
            [rng.randrange(3, vocab_size) for _ in range(rng.randint(*prompt_range))] for _ in range(num_requests)
        ]
        return cls(prompts, [rng.randint(*output_range) for _ in range(num_requests)])

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))


@dataclass
class ThroughputResult:
    system: str
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    seconds: float
    note: str = ""

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds

    def row(self) -> dict:
        return asdict(self) | {
            "output_tokens_per_s": self.output_tokens_per_s,
            "total_tokens_per_s": self.total_tokens_per_s,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ throughput
async def _engine_run(engine: Engine, work: Workload) -> int:
    outs = await asyncio.gather(
        *(
            engine.complete(GenerateRequest(p, SamplingParams(max_tokens=n, ignore_eos=True)))
            for p, n in zip(work.prompts, work.output_lens, strict=True)
        )
    )
    return sum(len(o.token_ids) for o in outs)


def bench_engine_throughput(engine: Engine, work: Workload) -> ThroughputResult:
    asyncio.run(_engine_run(engine, Workload(work.prompts[:2], [4] * len(work.prompts[:2]))))  # warm-up
    engine.pool.reset_prefix_cache()
    start = time.perf_counter()
    produced = asyncio.run(_engine_run(engine, work))
    _sync(engine.device)
    return ThroughputResult("kvfleet", len(work.prompts), work.prompt_tokens, produced, time.perf_counter() - start)


def bench_transformers_throughput(
    model, work: Workload, device: torch.device, batch_size: int, pad_id: int, static_cache: bool
) -> ThroughputResult:
    """Padded batches of similar prompt length; each batch generates its longest output, and
    only the tokens each request asked for count."""

    def run(idx: list[int]) -> int:
        batch = [work.prompts[i] for i in idx]
        n = max(work.output_lens[i] for i in idx)
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        kwargs = dict(cache_implementation="static", disable_compile=True) if static_cache else {}
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad_id,
                **kwargs,
            )
        return sum(work.output_lens[i] for i in idx)

    order = sorted(range(len(work.prompts)), key=lambda i: len(work.prompts[i]))
    run(order[:2])  # warm-up
    _sync(device)
    start = time.perf_counter()
    produced = sum(run(order[i : i + batch_size]) for i in range(0, len(order), batch_size))
    _sync(device)
    note = f"batch {batch_size}, {'static' if static_cache else 'dynamic'} cache, sorted by prompt length"
    return ThroughputResult(
        "transformers", len(work.prompts), work.prompt_tokens, produced, time.perf_counter() - start, note
    )


def transformers_model(model_dir: str, dtype: torch.dtype, device: torch.device, dummy: bool):
    import transformers

    from workers.models.gguf_file import find_gguf

    if find_gguf(model_dir) is not None:
        from cluster.default_model import transformers_from_gguf

        return transformers_from_gguf(model_dir, dtype, device)
    if dummy:  # same shapes, random weights (speed does not depend on the values)
        config = transformers.AutoConfig.from_pretrained(model_dir)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    return model.eval()


# ------------------------------------------------------------------ hardware
def measure_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """Device memory bandwidth in bytes/s from a large copy (bytes read + bytes written)."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n // 2, device=device, dtype=torch.float32).view(torch.bfloat16)[:n]
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / sorted(times)[len(times) // 2]


def _time_cuda(fn, iters: int = 20, warmup: int = 3, repeats: int = 5) -> float:
    """Seconds per call of fn(): `iters` calls back to back between two CUDA events (so the
    GPU's queue, not one call's launch latency, sets the pace), median over `repeats`."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return sorted(times)[len(times) // 2]


def _time_cuda_graph(fn, iters: int = 20, repeats: int = 5) -> float:
    """Seconds per call of fn() replayed from one CUDA graph of `iters` calls (as the engine's decode
    graphs run a kernel: no launch or host time between calls), median over `repeats`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile, allocate) off the capture
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return sorted(times)[len(times) // 2]


def bench_decode_steps(engine: Engine, batch_sizes: list[int], context_len: int, bandwidth: float) -> list[dict]:
    """Time runner.execute on decode steps of `batch` sequences with `context_len` tokens of
    context each (graphs as the engine would use them), and compare with bandwidth."""
    runner, pool, mc = engine.runner, engine.pool, engine.model_config
    # Quantized layers keep their weights as buffers; the rotary tables are buffers too, but a step
    # reads only its positions' rows of them.
    tensors = [*runner.model.parameters()] + [
        b for name, b in runner.model.named_buffers() if not name.endswith(("rotary.cos", "rotary.sin"))
    ]
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    kv_token_bytes = runner.page_bytes // engine.config.page_size
    rows = []
    for batch in batch_sizes:
        pages_each = -(-context_len // pool.page_size)
        if batch * pages_each > pool.num_free_pages:
            rows.append({"batch": batch, "skipped": "pool too small"})
            continue
        seqs = []
        for i in range(batch):
            seq = Sequence(
                f"bench-{i}", [(i * 7 + t) % mc.vocab_size for t in range(context_len)], SamplingParams(max_tokens=1)
            )
            seq.block_table = pool.allocate(pages_each)
            seqs.append(seq)
        out = SchedulerOutput([ScheduledSeq(s, context_len - 1, 1, True) for s in seqs])
        step = _time_cuda(lambda out=out: runner.execute(out), iters=30)
        for s in seqs:
            pool.free(s.block_table)
        bytes_read = weight_bytes + batch * context_len * kv_token_bytes
        rows.append(
            {
                "batch": batch,
                "context_len": context_len,
                "step_ms": step * 1e3,
                "tokens_per_s": batch / step,
                "bytes_per_step": bytes_read,
                "bandwidth_fraction": bytes_read / step / bandwidth,
                "cuda_graph": runner.graphs.bucket(batch) is not None,
            }
        )
    return rows


def bench_attention_kernels(device: torch.device, bandwidth: float, shapes=((64, 4096), (4, 32768))) -> list[dict]:
    return [_attention_case(device, bandwidth, batch, ctx) for batch, ctx in shapes]


def _attention_case(device, bandwidth, batch, ctx, heads=32, kv_heads=8, head_dim=128, page_size=16) -> dict:
    """Paged decode attention (bf16, Llama-3-8B heads) against SDPA on the same K/V, contiguous."""
    import functools

    import torch.nn.functional as F

    from workers.kernels.triton_attention import decode_attention, decode_num_splits

    pages = batch * ctx // page_size
    k_cache = torch.randn(pages, page_size, kv_heads, head_dim, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(pages, device=device, dtype=torch.int32).view(batch, ctx // page_size)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, head_dim, device=device, dtype=torch.bfloat16)
    o = torch.empty_like(q)
    splits = decode_num_splits(batch, kv_heads, ctx, torch.cuda.get_device_properties(device).multi_processor_count)
    ours_fn = functools.partial(
        decode_attention, q, o, k_cache, v_cache, tables, seq_lens, head_dim**-0.5, batch, splits, None
    )
    ours = _time_cuda(ours_fn)
    ours_graph = _time_cuda_graph(ours_fn)
    k = k_cache[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()  # [batch, kv_heads, ctx, head_dim]
    v = v_cache[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    sdpa = functools.partial(F.scaled_dot_product_attention, q[:, :, None], k, v, enable_gqa=True)
    ref = sdpa()[:, :, 0]
    kv_bytes = 2 * batch * ctx * kv_heads * head_dim * 2
    sdpa_s = _time_cuda(sdpa)
    sdpa_graph = _time_cuda_graph(sdpa)
    return {
        "shape": f"{batch} x {ctx}",
        "splits": splits,
        "ours_us": ours * 1e6,
        "sdpa_us": sdpa_s * 1e6,
        # inside a CUDA graph, as the engine's decode steps run it
        "ours_graph_us": ours_graph * 1e6,
        "sdpa_graph_us": sdpa_graph * 1e6,
        "graph_ratio_vs_sdpa": ours_graph / sdpa_graph,
        "ours_bandwidth_fraction": kv_bytes / ours / bandwidth,
        "sdpa_bandwidth_fraction": kv_bytes / sdpa_s / bandwidth,
        "rel_error_vs_sdpa": ((o.float() - ref.float()).norm() / ref.float().norm()).item(),
    }


# Engine options a bench parser may have grown; each one set on the command line reaches EngineConfig.
PASS_THROUGH = (
    "quantization",
    "quantization_group_size",
    "kv_cache_dtype",
    "dtype",
    "page_size",
    "num_pages",
    "gpu_memory_utilization",
)


def engine_config(args, model: str, device: torch.device, **overrides) -> EngineConfig:
    """The EngineConfig `kvfleet bench engine` builds, plus any engine option its parser has grown
    (PASS_THROUGH names that EngineConfig knows and the command line set)."""
    extra = {
        k: getattr(args, k)
        for k in PASS_THROUGH
        if k in EngineConfig.model_fields and getattr(args, k, None) is not None
    }
    return EngineConfig(
        model=model,
        device=str(device),
        **engine_options(args.load_format),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        **extra,
        **overrides,
    )


# ------------------------------------------------------------------ the command
def run_engine_bench(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    model = resolve_model(args, Path(args.json or ".").resolve().parent)
    dummy = args.load_format == "dummy"
    report: dict = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if gpu else "cpu",
        "torch": torch.__version__,
        "model": model,
        "load_format": args.load_format,
        "quantization": getattr(args, "quantization", "none"),
        "kv_cache_dtype": getattr(args, "kv_cache_dtype", "auto"),
    }
    engine = Engine(engine_config(args, model, device))

    def save() -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))

    dtype = next(engine.runner.model.parameters()).dtype
    report["dtype"] = str(dtype)
    report["kv_pages"] = engine.pool.num_pages
    print(f"engine: {model} on {report['device_name']} ({dtype}), {engine.pool.num_pages} KV pages", flush=True)

    if gpu and ("decode" in args.parts or "attention" in args.parts):
        report["bandwidth_bytes_per_s"] = bw = measure_bandwidth(device)
        print(f"measured copy bandwidth: {bw / 1e12:.2f} TB/s", flush=True)
    if gpu and "decode" in args.parts:
        report["decode"] = bench_decode_steps(engine, args.decode_batches, args.decode_context, bw)
        save()
        print(f"{'batch':>6}{'step ms':>10}{'tok/s':>10}{'GB/step':>9}{'of bw':>8}")
        for r in report["decode"]:
            if "step_ms" in r:
                print(
                    f"{r['batch']:>6}{r['step_ms']:>10.2f}{r['tokens_per_s']:>10.0f}"
                    f"{r['bytes_per_step'] / 1e9:>9.2f}{r['bandwidth_fraction']:>8.1%}",
                    flush=True,
                )

    results = []
    if "throughput" in args.parts:
        work = Workload.make(
            args.num_requests,
            (args.min_prompt, args.max_prompt),
            (args.min_output, args.max_output),
            engine.model_config.vocab_size,
            args.seed,
        )
        report["workload"] = {
            "num_requests": args.num_requests,
            "prompt_len": [args.min_prompt, args.max_prompt],
            "output_len": [args.min_output, args.max_output],
            "seed": args.seed,
        }
        results.append(bench_engine_throughput(engine, work))
        print(f"kvfleet: {results[-1].output_tokens_per_s:.0f} output tok/s", flush=True)
        report["throughput"] = [r.row() for r in results]
        save()
        report["engine_stats"] = asdict(engine.stats())
    pad_id = 0 if engine.tokenizer is None else (engine.tokenizer.pad_token_id or engine.tokenizer.eos_token_id or 0)
    engine.runner.release()
    del engine
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    if "attention" in args.parts and gpu:
        report["attention"] = bench_attention_kernels(device, bw)
        save()
        for r in report["attention"]:
            print(
                f"decode attention {r['shape']}: ours {r['ours_us']:.0f} us "
                f"({r['ours_bandwidth_fraction']:.0%} of bw), "
                f"SDPA contiguous {r['sdpa_us']:.0f} us ({r['sdpa_bandwidth_fraction']:.0%}); "
                f"in a CUDA graph {r['ours_graph_us']:.0f} vs {r['sdpa_graph_us']:.0f} us "
                f"({r['graph_ratio_vs_sdpa']:.3f}x), "
                f"rel err {r['rel_error_vs_sdpa']:.1e}",
                flush=True,
            )
    if "throughput" in args.parts and not args.no_compare:
        hf = transformers_model(model, dtype, device, dummy)
        results.append(bench_transformers_throughput(hf, work, device, args.hf_batch_size, pad_id, static_cache=gpu))
        del hf
    if results:
        report["throughput"] = [r.row() for r in results]
        print(f"{'system':<14}{'requests':>9}{'out tok':>9}{'seconds':>9}{'out tok/s':>11}{'total tok/s':>13}")
        for r in results:
            print(
                f"{r.system:<14}{r.num_requests:>9}{r.output_tokens:>9}{r.seconds:>9.2f}"
                f"{r.output_tokens_per_s:>11.1f}{r.total_tokens_per_s:>13.1f}"
            )
        if len(results) == 2:
            report["speedup_output_tokens_per_s"] = ratio = (
                results[0].output_tokens_per_s / results[1].output_tokens_per_s
            )
            print(f"kvfleet / transformers output tokens/s: {ratio:.2f}x")
    save()
    return report
