#!/usr/bin/env bash
# Issue 11's benchmark in one go on a GPU host: the service (8 workers) over raw /encode HTTP, OIP binary
# HTTP, gRPC and system shared memory (over HTTP and gRPC) at client batches 1/16/64, then a real Triton
# Inference Server (Python backend, same ONNX bundle, dynamic batching) under exactly the same load.
#
#   bash loadtest/gpu_oip_run.sh OUT_DIR
#
# Run from the repository root with the project's packages importable (onnxruntime-gpu, fastapi, uvicorn,
# tritonclient[http,grpc], gevent, geventhttpclient, grpcio, nvidia-pytriton installed --no-deps). Converts
# bundles/fp16 first where it does not exist. Writes into OUT_DIR: env.txt (host, Python, libraries),
# bench.json (every point: samples/s, p50/p99, errors, value checks, server batches, engine busy time, Triton's
# counters; targets), bench.log (the tables), bench-service.log and bench-triton.log (server output).
# About 6 minutes on an H200 host with the defaults; every knob below is an environment variable.
# SMOKE=1: the same run on a CPU with a small bundle and tiny durations (a minute or two), to try the script.
set -uo pipefail

OUT=${1:?usage: bash loadtest/gpu_oip_run.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=${DEVICE:-cpu} BUNDLE=${BUNDLE:-/tmp/gpu-oip-smoke-bundle} WORKERS=${WORKERS:-1} CLIENTS=${CLIENTS:-1}
  SEQ=${SEQ:-64} CONCURRENCY=${CONCURRENCY:-2} BATCHES=${BATCHES:-1,4} BATCH_SAMPLES=${BATCH_SAMPLES:-8}
  DURATION=${DURATION:-1} WARMUP=${WARMUP:-0.3} TRITON_INSTANCES=${TRITON_INSTANCES:-1}
  if [ ! -f "$BUNDLE/manifest.json" ]; then
    "$PY" -m converter --out "$BUNDLE" --precision fp32 --dim 64 --heads 4 --ffn 128 --max-seq-len 128 \
      --verify-provider cpu --log-level WARNING || exit 1
  fi
fi
DEVICE=${DEVICE:-cuda}
BUNDLE=${BUNDLE:-bundles/fp16}
WORKERS=${WORKERS:-8}
CLIENTS=${CLIENTS:-6}
SEQ=${SEQ:-196}
CONCURRENCY=${CONCURRENCY:-24,96,192}        # requests in flight at client batch 1
BATCHES=${BATCHES:-1,16,64}                  # samples per OIP request
BATCH_SAMPLES=${BATCH_SAMPLES:-768}          # samples in flight at batches > 1 (48 requests of 16, 12 of 64)
PROTOCOLS=${PROTOCOLS:-raw,oip-http,grpc,shm-http,shm-grpc}
DURATION=${DURATION:-3}
WARMUP=${WARMUP:-1}
MAX_BATCH=${MAX_BATCH:-64}                   # the service's and Triton's largest engine batch
MAX_DELAY_MS=${MAX_DELAY_MS:-0}              # the service's batch wait and Triton's max_queue_delay
TRITON_INSTANCES=${TRITON_INSTANCES:-2}
PROFILE_POINTS=${PROFILE_POINTS:-shm-http:16}  # py-spy the service at these loads (PROTOCOL:BATCH, comma-separated)
BUDGET_S=${BUDGET_S:-510}                    # the benchmark is stopped past this (the host allows 9 minutes)

{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB; /dev/shm: $(df -h /dev/shm | awk 'NR==2 {print $2}')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" - <<'EOF'
import importlib.util, sys, sysconfig
print("python", sys.version.split()[0], sys.executable)
print("libpython shared:", sysconfig.get_config_var("Py_ENABLE_SHARED"), "in", sysconfig.get_config_var("LIBDIR"))
for name in ("numpy", "onnxruntime", "tritonclient", "grpc", "gevent", "fastapi", "uvicorn"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as exc:  # the report says what is missing; the benchmark decides what it can run
        print(name, "NOT IMPORTABLE:", exc)
spec = importlib.util.find_spec("pytriton")
print("pytriton:", spec.submodule_search_locations[0] if spec else "not installed")
try:
    import onnxruntime
    print("onnxruntime providers:", onnxruntime.get_available_providers())
except Exception as exc:
    print("onnxruntime:", exc)
EOF
  "$PY" -c "from loadtest.peers.triton.server import check_stub, triton_home; check_stub(triton_home()); print('triton stub: loads')" 2>&1 | tail -1
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

"$PY" - "$PROTOCOLS" "$BATCHES" "$CONCURRENCY" "$BATCH_SAMPLES" "$DURATION" "$WARMUP" <<'EOF'
import sys
protocols, batches, conc, samples = (a.split(",") for a in sys.argv[1:5])
oip = [p for p in protocols if p != "raw"]
per_protocol = sum(len(conc) if int(b) == 1 else len({max(1, int(s) // int(b)) for s in samples}) for b in batches)
n = len(conc) * ("raw" in protocols) + 2 * len(oip) * per_protocol  # the service's points, then Triton's
each = float(sys.argv[5]) + float(sys.argv[6]) + 2.5  # measured + warm-up + client start
print(f"{n} points: about {n * each:.0f} s of load, plus server start-ups")
EOF

profile_flags=()
for point in ${PROFILE_POINTS//,/ }; do profile_flags+=(--profile-point "$point"); done

started=$(date +%s)
timeout --signal=INT --kill-after=20 "$BUDGET_S" "$PY" loadtest/bench_service.py \
  --device "$DEVICE" --model-dir "$BUNDLE" --servers service,triton --protocols "$PROTOCOLS" \
  --client-batches "$BATCHES" --concurrency "$CONCURRENCY" --batch-inflight-samples "$BATCH_SAMPLES" \
  --duration "$DURATION" --warmup "$WARMUP" --workers "$WORKERS" --clients "$CLIENTS" --seq "$SEQ" \
  --max-batch-size "$MAX_BATCH" --max-delay-ms "$MAX_DELAY_MS" --triton-instances "$TRITON_INSTANCES" \
  "${profile_flags[@]}" --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
echo "benchmark exit code $rc after $(( $(date +%s) - started ))s; results in $OUT" | tee -a "$OUT/bench.log"
exit "$rc"
