"""llama.cpp on the workload of `kvfleet bench engine`, for a same-run comparison on CPU (not a kvfleet
dependency: run it with a Python that has `llama-cpp-python`; `kvfleet bench realmodel` runs it for you).

    python -m cluster.bench.workload_json 16 > w.json          # the same prompts (Workload.make, seed 0)
    /path/to/llamacpp-venv/bin/python cluster/bench/llamacpp.py X.gguf w.json --threads 2 --json b.json

Each request runs alone (llama-cpp-python's `Llama` decodes one sequence), greedy, exactly its output
length (end-of-sequence ignored), the KV cache cleared between requests; tokens/s counts the outputs.

Extra buffer types (AMX, CPU repack) are off unless `--extra-bufts`: the registry's llama-cpp-python
0.3.36, built by GCC 12 with GGML_NATIVE on a CPU with AMX_INT8, crashes (SIGSEGV) in its AMX matmul on
the first decode. GCC 12's `_tile_loadconfig` tells the compiler it reads 8 bytes of the 64-byte tile
configuration, so -O3 drops the stores of the rows and column widths and LDTILECFG loads stack garbage
(a general-protection fault). Without extra buffer types the weights stay in the CPU buffer and the
AVX-512 kernels run them; the CPU repack it also turns off takes none of this file's Q4_1 weights (it
repacks Q4_0, Q4_K, Q8_0, IQ4_NL, ...). A build without AMX should not need the switch (untested here):
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
-DGGML_AVX512_VBMI=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
pip install llama-cpp-python==0.3.36 --no-binary :all:
"""

import argparse
import json
import os
import time
from pathlib import Path

import llama_cpp
from llama_cpp import Llama


def load(gguf: str, threads: int, extra_bufts: bool, n_ctx: int) -> Llama:
    """`Llama(gguf)` with `use_extra_bufts` set: llama-cpp-python has no argument for it, so the
    default model parameters it starts from are patched for the one call."""
    lib = llama_cpp.llama_cpp
    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra_bufts
        return p

    lib.llama_model_default_params = params
    try:
        return Llama(gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    finally:
        lib.llama_model_default_params = default


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("gguf")
    p.add_argument("workload", help="JSON: {prompts: [[ids]], output_lens: [n]}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=1024)
    p.add_argument(
        "--extra-bufts", action="store_true", help="let llama.cpp repack weights into AMX/CPU-repack buffers"
    )
    p.add_argument("--json")
    args = p.parse_args()
    work = json.loads(Path(args.workload).read_text())
    llm = load(args.gguf, args.threads, args.extra_bufts, args.n_ctx)

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
        "prompt_tokens": sum(map(len, work["prompts"])),
        "output_tokens": produced,
        "seconds": seconds,
        "output_tokens_per_s": produced / seconds,
        "threads": args.threads,
        "extra_bufts": args.extra_bufts,
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "load_average_after": os.getloadavg(),
        "note": "llama-cpp-python, one request at a time, greedy, the GGUF's own quantization",
    }
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
