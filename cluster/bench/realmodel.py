"""`kvfleet bench realmodel`: llama.cpp, kvfleet and transformers on one GGUF, same prompts, same run (CPU).

It runs, one after the other, on the prompts of `kvfleet bench engine` (Workload.make, its seed):
  1. llama.cpp on 1 request, through cluster/bench/llamacpp.py in another Python that has
     `llama-cpp-python` (`--llamacpp-python`; not a kvfleet dependency), the GGUF's own quantization;
  2. `kvfleet bench engine --num-requests 1 --hf-batch-size 1`: kvfleet, then transformers;
  3. llama.cpp on the 16 requests, one at a time (it decodes one sequence);
  4. `kvfleet bench engine --num-requests 16 --hf-batch-size 16`,
(`--repeats R`: steps 1-2 R times, alternating, then 3-4; each system's row is its median run), and
writes the rows, the load average before and after each step, and the ratios. On a CPU that other work
shares, run it with OMP_WAIT_POLICY=passive: torch and llama.cpp both use OpenMP, whose spinning barriers
make 2 threads 10-20x slower than 1 when a core is taken (the variable must be set before torch loads, so
in the environment; llama.cpp's process inherits it; the report records it). Everything after `--` goes
to `kvfleet bench engine` as is, so its engine options (e.g. a future `--quantization`) apply.
Passive alone makes each OpenMP region wake a sleeping thread: 50-70 us per matmul, about 40% of a
batch-1 decode step of the 135M model (measured 2026-12-05: gguf 36 ms/step passive, 20 ms with
threads spinning). GOMP_SPINCOUNT=30000 (libgomp, torch's and llama.cpp's OpenMP; about 0.3 ms)
keeps threads spinning across a step's op gaps but gives a taken core back soon; both systems get it:

    OMP_WAIT_POLICY=passive GOMP_SPINCOUNT=30000 kvfleet bench realmodel \
        --llamacpp-python /work/llamacpp-venv/bin/python --json bench/results/realmodel-cpu.json -- --quantization int8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HARNESS = Path(__file__).with_name("llamacpp.py")


def add_realmodel_parser(bench, engine_parser: argparse.ArgumentParser) -> None:
    p = bench.add_parser(
        "realmodel",
        help="llama.cpp vs kvfleet vs transformers on the default GGUF, same prompts, same run (CPU)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--llamacpp-python", help="a Python with llama-cpp-python; none: kvfleet and transformers only")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every system")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="requests per run (transformers batch)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each system, alternating; rows: the median")
    p.add_argument("--extra-bufts", action="store_true", help="let llama.cpp use AMX/repack buffers")
    p.add_argument("--json", help="write the report here")
    p.add_argument("engine_args", nargs=argparse.REMAINDER, help="after --: options of `kvfleet bench engine`")
    p.set_defaults(func=run_realmodel_bench, engine_parser=engine_parser)


def _llamacpp(args, gguf: str, work) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        wpath, out = Path(tmp) / "w.json", Path(tmp) / "row.json"
        wpath.write_text(json.dumps({"prompts": work.prompts, "output_lens": work.output_lens}))
        cmd = [args.llamacpp_python, str(HARNESS), gguf, str(wpath), "--threads", str(args.threads), "--json", str(out)]
        cmd += ["--extra-bufts"] if args.extra_bufts else []
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        subprocess.run(cmd, check=True, env=env)
        return json.loads(out.read_text())


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b:
        return None
    return a["output_tokens_per_s"] / b["output_tokens_per_s"]


def run_realmodel_bench(args) -> dict:
    import torch

    from cluster.bench.engine import Workload, run_engine_bench
    from cluster.default_model import default_model_path

    gguf = str(args.model or default_model_path())
    torch.set_num_threads(args.threads)
    extra = args.engine_args[1:] if args.engine_args[:1] == ["--"] else args.engine_args
    report: dict = {
        "what": "llama.cpp (GGUF quantization) vs kvfleet vs transformers, same prompts, same run",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": gguf,
        "threads": args.threads,
        "engine_args": extra,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_start": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", ""),
        "runs": [],
    }

    def save() -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))

    for n in args.batch_sizes:
        argv = [*extra, "--model", gguf, "--num-requests", str(n), "--hf-batch-size", str(n)]
        eng = args.engine_parser.parse_args([*argv, "--parts", "throughput", "--device", "cpu"])
        run: dict = {"num_requests": n, "load_average_before": os.getloadavg(), "rows": {}, "all_rows": []}
        for _ in range(args.repeats):
            if args.llamacpp_python:
                # The engine's vocabulary is the GGUF's; Workload.make draws the same prompts from it.
                from workers.models.gguf import read_config

                vocab = read_config(Path(gguf)).vocab_size
                lens = (eng.min_prompt, eng.max_prompt), (eng.min_output, eng.max_output)
                row = _llamacpp(args, gguf, Workload.make(n, *lens, vocab, eng.seed))
                run["all_rows"].append(row)
                print(f"llama.cpp, {n} request(s): {row['output_tokens_per_s']:.1f} tok/s", flush=True)
            engine_report = run_engine_bench(eng)
            run["all_rows"] += engine_report.get("throughput", [])
        for system in dict.fromkeys(r["system"] for r in run["all_rows"]):
            mine = sorted((r for r in run["all_rows"] if r["system"] == system), key=lambda r: r["output_tokens_per_s"])
            run["rows"][system] = mine[(len(mine) - 1) // 2]  # the median run (the lower one of an even count)
        run["kvfleet_dtype"] = engine_report.get("dtype")
        run["load_average_after"] = os.getloadavg()
        rows = run["rows"]
        run["ratios"] = {
            "kvfleet_over_llamacpp": _ratio(rows.get("kvfleet"), rows.get("llama.cpp")),
            "transformers_over_llamacpp": _ratio(rows.get("transformers"), rows.get("llama.cpp")),
            "kvfleet_over_transformers": _ratio(rows.get("kvfleet"), rows.get("transformers")),
        }
        report["runs"].append(run)
        save()
    report["python"] = sys.version.split()[0]
    report["torch"] = torch.__version__
    save()
    print(json.dumps([{"n": r["num_requests"], **r["ratios"]} for r in report["runs"]], indent=1))
    return report
