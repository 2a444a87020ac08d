#!/usr/bin/env bash
# One GPU round of the engine work (run on the device machine with onnxruntime-gpu on PYTHONPATH):
# convert the variants with the converter's own CUDA-EP fp16 verification, then benchmark them in one process.
#   bash loadtest/experiments/engine_round.sh OUTDIR "BENCH ARGS..."   e.g. bash loadtest/experiments/engine_round.sh $OUT "--no-compile"
# The first bundle is the table's "ours"; the bert bundle is the same-run baseline.
set -uo pipefail
out=${1:?outdir}; shift
bench_args=${1:-}
export PYTHONUNBUFFERED=1
b=/tmp/bundles; mkdir -p $b
conv() { name=$1; shift; python -m converter --precision fp16 --verify-provider cuda --out $b/$name "$@" \
  > $out/convert-$name.log 2>&1; echo "convert $name rc=$? $(tail -1 $out/convert-$name.log)"; }
conv base --graph-opt none &
conv split-concat --graph-opt mha-split --graph-opt ffn-bias-concat &
conv split-gemm8 --graph-opt mha-split --graph-opt ffn-gemm8 &
wait
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
host=pinned
python loadtest/experiments/smoke_pinned.py $b/base 2>&1 | grep -v "No registered plugin EP" | tail -8 | tee $out/smoke.txt
grep -q "SMOKE OK" $out/smoke.txt || host=pageable
python loadtest/bench_engine.py --profile-batch 512 --host-path $host $bench_args \
  --bundle $b/split-concat=split_concat --bundle $b/base=bert --bundle $b/split-gemm8=split_gemm8_nograph \
  --out $out/engine.json 2>&1 | grep -v "No registered plugin EP\|shape massaging" | tee $out/bench.log
