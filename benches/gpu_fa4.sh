#!/usr/bin/env bash
# GPU pass for the attention work: FA4 from carried wheels (when present), build, GPU tests, attention benches.
# Logs and JSON under $OUT. Usage: benches/gpu_fa4.sh [bench names...]  (default: mv_attention attention_choice)
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MVWORLD_CUDA_ARCHS=${MVWORLD_CUDA_ARCHS:-90a}
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages; fi
python3 -c "import flash_attn.cute, importlib.metadata as m; print('FA4', m.version('flash-attn-4'))" 2>&1 | tail -1
(time python3 -m pip install --no-build-isolation --no-deps -e .) > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
tail -3 "$OUT/build.log"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest ${TESTS:-tests/test_fa4_backend.py tests/test_qk_norm_rope.py tests/test_model_backends.py} \
    -q -p no:cacheprovider 2>&1 | tail -25 > "$OUT/tests.log"; tail -6 "$OUT/tests.log"
fi
for b in ${@:-mv_attention attention_choice}; do
  echo "== $b"
  timeout ${BENCH_TIMEOUT:-240} python3 -m pytest "benches/bench_$b.py" -q -s -p no:cacheprovider \
    --benchmark-json="$OUT/$b.json" > "$OUT/$b.log" 2>&1
  grep -vE "^\s*$|warn|Warn|^-+$|Legend|Outliers|OPS|Name \(time|^bench" "$OUT/$b.log" | tail -${BENCH_LINES:-40}
done
cp mvmodel/networks/attention_table.json "$OUT/" 2>/dev/null || true
