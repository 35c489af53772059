#!/usr/bin/env bash
# One GPU session: build, GPU tests, benchmarks; logs under $OUT (or ./gpu_out).
# Usage: TESTS="tests/test_x.py ..." BENCHES="benches/bench_x.py ..." benches/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
( time python3 -m pip install --no-build-isolation --no-deps -e . -v ) > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
grep -E "summary|path|mvworld:" "$OUT/build.log"
python3 -m pytest ${TESTS:-tests/test_qk_norm_rope.py tests/test_rope3d.py tests/test_build.py} -q -x 2>&1 | tee "$OUT/tests.log" | tail -5
python3 -m pytest ${BENCHES:-benches/bench_qk_norm_rope.py} -q -s --benchmark-json="$OUT/run.json" 2>&1 | tee "$OUT/bench.log" | grep -vE "^\s*$" | tail -40
python3 benches/compare.py "$OUT/run.json" --update && cp benches/baselines/*.json "$OUT/" 2>/dev/null
