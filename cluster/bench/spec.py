"""`kvfleet bench spec`: what speculative decoding buys, per proposer and k, against no
speculation in the same run.

For each batch size and each k, one target engine generates the same requests (the demo pair by
default, greedy unless --temperature) with k fixed, once per proposer (n-gram, the in-process draft,
draft replicas) and once with speculation switched off (the baseline): all of them in turn within
each of `--repeats` rounds, the best of each counting, so a machine whose speed drifts moves them
all, and every row has the same target, threads and machine state. Reported per row: acceptance
rate a (accepted / proposed), mean tokens per target step per sequence (accepted + 1) beside the
theory (1 - a^(k+1)) / (1 - a) for that a, and the decode speedup (output tokens per second over
the baseline's). Wall times cover whole requests (prompts are short: decode dominates).

`--proposers replicas` starts a local Ray (`--ray-cpus`, no fixed port), a private Redis for the
page index and Ray Serve (no proxies), deploys `--draft-replicas` DraftWorkers behind their sticky
prefix-aware router (cluster/bench/spec_replicas.py), and the target engine here talks to them
through a real DeploymentHandle (workers/spec/draft_client.py's RoutedDraftProposer): the same
rows as the in-process draft, timed beside them; the report's `replicas_vs_in_process` gives
the ratio of their tok/s per (batch, k). `replicas` is the client as the cluster runs it (pinned
calls straight to the replica over its socket channel, proposals computed ahead during
verification); `replicas-actor` sends those calls through the replica's actor instead;
`replicas-selective` asks for lookaheads only where steps often accept everything,
`replicas-direct` never; `replicas-plain` is the client without either (every call through the
handle's router, no lookahead), for a before/after in one run. `draft_round_trip_ms`: the median
of an empty call pinned to a replica (no draft work) over its channel, its actor and the handle.

    kvfleet bench spec --device cuda --json bench/results/spec-h100.json
    kvfleet bench spec --proposers draft replicas --json bench/results/spec-cpu-replicas.json
    python -m cluster.bench.spec ...      (no Ray needed without `replicas`)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cluster.demo.model import shipped_demo_pair
from workers.config import EngineConfig, SpeculativeConfig
from workers.engine import Engine
from workers.request import GenerateRequest, SamplingParams
from workers.runner.config import resolve_device
from workers.spec.decoder import build_speculative_decoder, expected_tokens

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

# For a chat model (a tokenizer with a chat template): one user turn each, rendered by the template.
CHAT_QUESTIONS = [
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "What are three tips for staying focused while studying?",
    "Explain how a refrigerator works.",
    "What is the difference between a virus and a bacterium?",
    "Give me a recipe for pancakes.",
    "Summarize the plot of Romeo and Juliet.",
    "How do airplanes stay in the air?",
]


def bench_prompts(tok, batch: int) -> list[list[int]]:
    if not getattr(tok, "chat_template", None):
        return [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
    out = []
    for i in range(batch):
        messages = [{"role": "user", "content": CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)]}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(tok.encode(text, add_special_tokens=False))
    return out


async def generate_all(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    outs = await asyncio.gather(*(engine.complete(GenerateRequest(p, params)) for p in prompts))
    return [o.token_ids for o in outs]


def _timed(engine: Engine, prompts, params) -> tuple[float, list[list[int]]]:
    """One run's wall time, and its outputs."""
    start = time.perf_counter()
    outputs = asyncio.run(generate_all(engine, prompts, params))
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return time.perf_counter() - start, outputs


def _engine_config(args, speculative: SpeculativeConfig | None, max_batch: int) -> EngineConfig:
    return EngineConfig(
        model=args.target,
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=max_batch,
        max_model_len=args.max_model_len,
        num_pages=args.num_pages,
        speculative=speculative,
        cpu_threads=args.cpu_threads,
    )


def run_spec_bench(args) -> dict:
    # One target engine runs every row, with the same torch threads (resolved before Ray starts):
    # the rows differ only in their proposer, and each repeat times them all, in turn.
    args.cpu_threads = args.cpu_threads or _target_threads(args)
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
        "cpu_threads": args.cpu_threads,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],  # 1, 5, 15 min: a shared machine's noise
        "rows": [],
    }
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=0, ignore_eos=True)
    warm = SamplingParams(max_tokens=8, temperature=args.temperature, seed=0, ignore_eos=True)
    specs = {
        name: SpeculativeConfig(
            method="replicas" if name.startswith("replicas") else name,
            draft_model=args.draft if name == "draft" else None,
            num_speculative_tokens=k_max,
            adaptive=False,
            max_batch_size=max_batch,
        )
        for name in args.proposers
    }
    replicas = None
    if any(name.startswith("replicas") for name in args.proposers):
        from cluster.bench.spec_replicas import DraftReplicas

        replicas = DraftReplicas(args, _engine_config(args, None, max_batch), k_max)
        report.update(draft_replicas=args.draft_replicas, ray_cpus=args.ray_cpus, draft_threads=replicas.draft_threads)
    # (the clients' device is the engine's, set below once the engine has resolved it)
    clients = {n: replicas.proposer(n, torch.device("cpu")) for n in specs if n.startswith("replicas")}
    first = args.proposers[0]
    engine = Engine(_engine_config(args, specs[first], max_batch), proposer=clients.get(first))
    for client in clients.values():
        client.device = engine.device
    decoders = {first: engine.spec}
    for name in args.proposers[1:]:
        decoders[name] = build_speculative_decoder(
            specs[name], engine.runner.cfg, engine.runner.num_pages, engine.model_config.vocab_size, clients.get(name)
        )
    report["like_for_like"] = (
        f"one target engine in this process ({torch.get_num_threads()} torch threads) runs every row and the "
        "no-speculation baseline, timed in turn within each repeat (Ray and the draft replicas up for all of them "
        "when a replicas row is asked for); the rows differ only in their proposer. The in-process draft shares "
        "the target's threads; a draft replica has its own (draft_threads)."
    )
    try:
        for batch in args.batch_sizes:
            _bench_batch(args, engine, decoders, clients, batch, params, warm, report)
    finally:
        engine.spec = decoders[first]
        asyncio.run(engine.shutdown())
        for name, client in clients.items():
            report.setdefault("draft_client", {})[name] = asdict(client.stats)
        if replicas is not None:
            try:
                report["draft_round_trip_ms"] = replicas.round_trips()
            finally:
                replicas.close()
    report["replicas_vs_in_process"] = _ratios(report["rows"])
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    for r in report["replicas_vs_in_process"]:
        print(f"{r['proposer']} / in-process draft: batch {r['batch']:>3}  k={r['k']}  {r['tok_per_s_ratio']:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def _target_threads(args) -> int:
    """The target's torch threads unless told: torch's default; on CPU beside draft replicas, the cores
    those do not reserve (a draft replica computes while the target verifies: a target with every
    core's thread would share them with it, as no replica of a cluster reserving its CPUs does)."""
    cores = torch.get_num_threads()
    if resolve_device(args.device).type != "cpu" or not any(p.startswith("replicas") for p in args.proposers):
        return cores
    per_replica = args.draft_cpu_threads or max(1, int(args.draft_num_cpus))
    return max(1, cores - args.draft_replicas * per_replica)


def _bench_batch(args, engine, decoders, clients, batch, params, warm, report) -> None:
    from cluster.bench.spec_replicas import lookahead_row

    prompts = bench_prompts(engine.tokenizer, batch)
    engine.spec = None
    asyncio.run(generate_all(engine, prompts, warm))
    for k in args.ks:
        for decoder in decoders.values():
            decoder.k_max = k
            engine.spec = decoder
            asyncio.run(generate_all(engine, prompts, warm))
        before = {n: asdict(d.stats) for n, d in decoders.items()}
        client_before = {n: asdict(c.stats) for n, c in clients.items()}
        # The baseline and every proposer run in turn, the order reversed every other repeat, so a
        # machine whose speed drifts during the run (a shared VM) moves them all; the best counts.
        names = list(decoders)
        base, best, outs = float("inf"), dict.fromkeys(names, float("inf")), {}
        for rep in range(args.repeats):
            for name in [None, *names] if rep % 2 == 0 else [*reversed(names), None]:
                engine.spec = decoders[name] if name else None
                t, out = _timed(engine, prompts, params)
                if name is None:
                    base, base_out = min(base, t), out
                else:
                    best[name], outs[name] = min(best[name], t), out
        base_tps = batch * args.max_tokens / base
        for name, decoder in decoders.items():
            d = {f: v - before[name][f] for f, v in asdict(decoder.stats).items()}
            a = d["num_accepted"] / d["num_proposed"] if d["num_proposed"] else 0.0
            row = {
                "proposer": name,
                "batch": batch,
                "k": k,
                "acceptance_rate": round(a, 4),
                "mean_tokens_per_step": round(d["num_emitted"] / d["num_steps"], 3) if d["num_steps"] else 0.0,
                "theory_tokens_per_step": round(expected_tokens(a, k), 3),
                "tok_per_s": round(batch * args.max_tokens / best[name], 1),
                "baseline_tok_per_s": round(base_tps, 1),
                "speedup": round(base / best[name], 3),
                # greedy only: the outputs with and without speculation, token for token
                "identical_output": outs[name] == base_out if args.temperature == 0 else None,
                "draft_ms_per_call": round(1e3 * d["draft_time_s"] / max(1, d["num_draft_calls"]), 3),
                # the target's verification steps: a draft replica computing beside them slows them
                "verify_ms_per_step": round(1e3 * d["verify_time_s"] / max(1, d["num_verify_steps"]), 3),
                "target_threads": torch.get_num_threads(),
                "draft_threads": report.get("draft_threads") if name.startswith("replicas") else "target's",
            }
            if name in clients:
                row.update(lookahead_row(client_before[name], asdict(clients[name].stats)))
            report["rows"].append(row)
            print(
                f"[{name}] batch {batch:>3}  k={k}  no speculation {base_tps:9.1f} tok/s  a={a:.3f}  "
                f"tokens/step {row['mean_tokens_per_step']:.2f} (theory {row['theory_tokens_per_step']:.2f})  "
                f"{row['tok_per_s']:9.1f} tok/s  speedup {row['speedup']:.2f}x  draft {row['draft_ms_per_call']:.2f} "
                f"ms/call  verify {row['verify_ms_per_step']:.2f} ms  identical {row['identical_output']}",
                flush=True,
            )
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))


def _ratios(rows: list[dict]) -> list[dict]:
    """tok/s of draft replicas (either client) over the in-process draft's, per (batch, k) both ran."""
    local = {(r["batch"], r["k"]): r for r in rows if r["proposer"] == "draft"}
    out = []
    for r in rows:
        twin = local.get((r["batch"], r["k"]))
        if r["proposer"].startswith("replicas") and twin is not None:
            ratio = r["tok_per_s"] / twin["tok_per_s"]
            out.append(
                {"proposer": r["proposer"], "batch": r["batch"], "k": r["k"], "tok_per_s_ratio": round(ratio, 3)}
            )
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    target, draft = shipped_demo_pair()
    p.add_argument("--target", default=str(target))
    p.add_argument("--draft", default=str(draft))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--proposers",
        nargs="+",
        default=["ngram", "draft"],
        choices=[
            "ngram",
            "draft",
            "replicas",
            "replicas-actor",
            "replicas-selective",
            "replicas-direct",
            "replicas-plain",
        ],
    )
    p.add_argument("--draft-replicas", type=int, default=2, help="DraftWorker replicas (proposer 'replicas')")
    p.add_argument("--draft-num-cpus", type=float, default=1.0, help="CPUs Ray reserves per draft replica")
    p.add_argument(
        "--draft-num-gpus", type=float, default=None, help="GPUs per draft replica (default: 0.5 on CUDA, else 0)"
    )
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch threads of the target here, every row (default: torch's; on CPU with replicas rows, the cores "
        "the draft replicas do not reserve)",
    )
    p.add_argument(
        "--draft-cpu-threads",
        type=int,
        default=None,
        help="torch threads of each draft replica (default: its --draft-num-cpus, as the cluster runs it)",
    )
    p.add_argument("--draft-timeout-s", type=float, default=5.0, help="a step's deadline for its proposal calls")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray (default: the machine's)")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--num-pages", type=int, default=4096, help="KV pages of the target (and of the draft)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--repeats", type=int, default=2, help="timed runs per setting, each beside a baseline run; the best counts"
    )
    p.add_argument("--json", help="also write the report here")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench.spec", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run_spec_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
