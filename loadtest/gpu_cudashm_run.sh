#!/usr/bin/env bash
# CUDA shared memory on a GPU host in one go (issue 13): first the verification (tritonclient's own
# cuda_shared_memory utilities: answers equal /encode's over HTTP and gRPC, the device-to-device path taken, every
# refusal a 4xx, no leak), then the benchmark: raw /encode, system shared memory and CUDA shared memory at client
# batches 1/16/64 against the engine's own device-only samples/s, measured first in the same run. The batch-1 CUDA
# point is profiled (py-spy) with the load's client processes, so the JSON says whether a limit is in the clients,
# the workers or the engine process.
#
#   bash loadtest/gpu_cudashm_run.sh OUT_DIR                 # both steps
#   STEPS=verify bash loadtest/gpu_cudashm_run.sh OUT_DIR    # then STEPS=bench: one step per command
#
# Run from the repository root with the project's packages importable (onnxruntime-gpu, tritonclient[http,grpc],
# cuda-python, gevent, geventhttpclient, py-spy). Converts bundles/fp16 first where it does not exist. Writes into
# OUT_DIR: verify.json and verify.log (the verification), bench.json and bench.log (every point: samples/s,
# p50/p99, errors, value checks, engine batches and busy time, the shared-memory path counts, the profile; the
# engine's device-only rates and the 80 % target per batch-64 load), bench-profile-*.txt (collapsed stacks).
# About 5 minutes on an H200 host. Every knob below is an environment variable.
# SMOKE=1: the same on a CPU with the service's fake CUDA layer and a small fp16 bundle (a minute or two).
set -uo pipefail

OUT=${1:?usage: bash loadtest/gpu_cudashm_run.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
VERIFY_FLAGS=()
if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=${DEVICE:-cpu} BUNDLE=${BUNDLE:-/tmp/gpu-cudashm-smoke-bundle} WORKERS=${WORKERS:-2} CLIENTS=${CLIENTS:-1}
  SEQ=${SEQ:-64} CONCURRENCY=${CONCURRENCY:-4} BATCHES=${BATCHES:-1,4} BATCH_SAMPLES=${BATCH_SAMPLES:-16}
  DURATION=${DURATION:-1} WARMUP=${WARMUP:-0.3} CYCLES=${CYCLES:-10} MAX_BATCH=${MAX_BATCH:-64}
  VERIFY_FLAGS=(--fake --provider cpu)
  if [ ! -f "$BUNDLE/manifest.json" ]; then
    "$PY" -m converter --out "$BUNDLE" --precision fp16 --dim 64 --heads 4 --ffn 128 --max-seq-len 128 \
      --verify-provider cpu --log-level WARNING || exit 1
  fi
fi
DEVICE=${DEVICE:-cuda}
BUNDLE=${BUNDLE:-bundles/fp16}
WORKERS=${WORKERS:-8}
CLIENTS=${CLIENTS:-6}
SEQ=${SEQ:-196}
CONCURRENCY=${CONCURRENCY:-96,192}           # requests in flight at client batch 1
BATCHES=${BATCHES:-1,16,64}                  # samples per request
BATCH_SAMPLES=${BATCH_SAMPLES:-1536}         # samples in flight at batches > 1 (96 requests of 16, 24 of 64)
PROTOCOLS=${PROTOCOLS:-raw,shm-http,cuda-shm}
DURATION=${DURATION:-4}
WARMUP=${WARMUP:-1}
MAX_BATCH=${MAX_BATCH:-256}                  # the service's largest engine batch
CYCLES=${CYCLES:-100}                        # register/infer/unregister cycles of the verification's leak check
PROFILE_POINTS=${PROFILE_POINTS:-cuda-shm:1}  # py-spy the service and the clients at these loads (comma-separated)
CUDA_CHECK_EVERY=${CUDA_CHECK_EVERY:-1}      # CUDA loads: read back the values of every N-th answer per client slot
BUDGET_S=${BUDGET_S:-540}                    # each of the two steps is stopped past this
STEPS=${STEPS:-verify,bench}                 # which steps run (one each: two commands of under 10 minutes)

if [ "$DEVICE" = cuda ] && [ ! -f "$BUNDLE/manifest.json" ]; then
  "$PY" -m converter --out "$BUNDLE" --precision fp16 --verify-provider cuda || exit 1
fi

verified=0
if [[ ",$STEPS," == *,verify,* ]]; then
  timeout --signal=INT --kill-after=20 "$BUDGET_S" "$PY" loadtest/verify_cudashm.py --model-dir "$BUNDLE" \
    --seq "$SEQ" --batches "$BATCHES" --cycles "$CYCLES" "${VERIFY_FLAGS[@]}" --out "$OUT/verify.json" \
    2>&1 | tee "$OUT/verify.log"
  verified=${PIPESTATUS[0]}
fi

profile_flags=()
for point in ${PROFILE_POINTS//,/ }; do profile_flags+=(--profile-point "$point"); done
[ ${#profile_flags[@]} -gt 0 ] && profile_flags+=(--profile-clients)
devices=()
[ "$DEVICE" = cuda ] && devices=(--devices "${DEVICES:-0}")

benched=0
if [[ ",$STEPS," == *,bench,* ]]; then
  timeout --signal=INT --kill-after=20 "$BUDGET_S" "$PY" loadtest/bench_service.py \
    --device "$DEVICE" --model-dir "$BUNDLE" --servers service "${devices[@]}" --protocols "$PROTOCOLS" \
    --client-batches "$BATCHES" --concurrency "$CONCURRENCY" --batch-inflight-samples "$BATCH_SAMPLES" \
    --duration "$DURATION" --warmup "$WARMUP" --workers "$WORKERS" --clients "$CLIENTS" --seq "$SEQ" \
    --max-batch-size "$MAX_BATCH" --max-delay-ms 0 --cuda-check-every "$CUDA_CHECK_EVERY" "${profile_flags[@]}" \
    --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
  benched=${PIPESTATUS[0]}
fi
echo "steps $STEPS: verification exit code $verified, benchmark exit code $benched; results in $OUT"
[ "$verified" = 0 ] && [ "$benched" = 0 ]
