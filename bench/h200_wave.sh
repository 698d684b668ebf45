#!/usr/bin/env bash
# This wave's end-to-end GPU figures in one device call (issues 18 and 19): decode step time per
# quantization scheme on the Llama-3-8B shape (dummy weights), offline throughput bf16 vs fp8, KV
# pages with fp8 KV, the shared-prefix workload; then the GPU tests of the new kernels.
# Run from the repository root on the GPU machine; JSON lands in ${RESULTS:-bench/results}.
set -uo pipefail
out="${RESULTS:-bench/results}"
k() { python3 -m cluster.cli bench engine --shape llama3-8b --load-format dummy --device cuda --max-model-len 4096 --no-compare "$@"; }
for q in none fp8 int8 int4; do
  k --parts decode --decode-batches 1 64 --quantization "$q" --json "$out/quant-decode-$q-h200.json" 2>&1 | grep -v Warning
done
for q in none fp8; do
  k --parts throughput --num-requests 500 --min-prompt 128 --max-prompt 2048 --min-output 128 --max-output 512 \
    --quantization "$q" --json "$out/quant-offline-$q-h200.json" 2>&1 | tail -3
done
k --parts decode --decode-batches 1 64 --kv-cache-dtype fp8 --json "$out/kv-fp8-h200.json" 2>&1 | grep -v Warning
k --workload shared-prefix --prefix-len 2048 --json "$out/shared-prefix-h200.json" 2>&1 | tail -12
