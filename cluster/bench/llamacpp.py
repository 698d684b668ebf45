"""llama.cpp on the workload of `kvfleet bench engine`, for a same-run comparison on CPU (not a kvfleet
dependency: run it with a Python that has `llama-cpp-python`).

    python -m cluster.bench ... (kvfleet side)        # or: kvfleet bench engine --model X.gguf --json a.json
    python -m cluster.bench.workload_json 16 > w.json          # the same prompts (Workload.make, seed 0)
    /path/to/llamacpp-venv/bin/python cluster/bench/llamacpp.py X.gguf w.json --threads 2 --json b.json

Each request runs alone (llama-cpp-python's `Llama` decodes one sequence), greedy, exactly its output
length (end-of-sequence ignored), the KV cache cleared between requests; tokens/s counts the outputs.
"""

import argparse
import json
import time
from pathlib import Path

from llama_cpp import Llama


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("gguf")
    p.add_argument("workload", help="JSON: {prompts: [[ids]], output_lens: [n]}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    work = json.loads(Path(args.workload).read_text())
    llm = Llama(args.gguf, n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)

    def run(prompt, n):
        llm.reset()
        for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), 1):
            if i == n:
                return n
        return n

    run(work["prompts"][0], 4)  # warm-up
    start = time.perf_counter()
    produced = sum(run(pr, n) for pr, n in zip(work["prompts"], work["output_lens"], strict=True))
    seconds = time.perf_counter() - start
    row = {
        "system": "llama.cpp",
        "num_requests": len(work["prompts"]),
        "output_tokens": produced,
        "seconds": round(seconds, 3),
        "output_tokens_per_s": round(produced / seconds, 2),
        "threads": args.threads,
        "note": "llama-cpp-python, one request at a time, greedy, the GGUF's own quantization",
    }
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
