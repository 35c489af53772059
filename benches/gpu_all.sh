#!/usr/bin/env bash
# Full GPU pass: build, every GPU test, then the benchmarks in priority order, each into its own JSON under $OUT
# (a run cut short still returns what finished). Usage: benches/gpu_all.sh [bench names...]
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MVWORLD_CUDA_ARCHS=${MVWORLD_CUDA_ARCHS:-90a}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 240 python3 -m pytest ${TESTS:-tests/test_qk_norm_rope.py tests/test_rope3d.py tests/test_mv_attention.py tests/test_model_*.py} -q -p no:cacheprovider 2>&1 | tail -15 > "$OUT/tests.log"; tail -3 "$OUT/tests.log"
fi
for b in ${@:-qk_norm_rope mv_attention dit_block train_step inference_step}; do
  f=benches/bench_$b.py; [ -f "$f" ] || { echo "skip $b (no $f)"; continue; }
  echo "== $b"
  timeout ${BENCH_TIMEOUT:-200} python3 -m pytest "$f" -q -s -p no:cacheprovider --benchmark-json="$OUT/$b.json" > "$OUT/$b.log" 2>&1
  grep -vE "^\s*$|warn|Warn|^-+$|Legend|Outliers|OPS|Name \(time" "$OUT/$b.log" | tail -${BENCH_LINES:-14}
done
