#!/usr/bin/env bash
# The one GPU pass (how every GPU claim is checked): carried wheels, build, every GPU test (`pytest -m gpu`: the
# tests CI skips), then the benchmarks in priority order. Each result lands under $OUT as soon as it exists, so a
# run cut short still returns what finished.
# Usage: benches/gpu_run.sh [bench names...]   (default: the list below, most important first)
# Env: TESTS (pytest arguments, default "-m gpu tests"), SKIP_TESTS=1, TEST_TIMEOUT / BENCH_TIMEOUT (seconds).
# Wheels: small ones in .whl/*.whl; big ones split by the wheel-splitting tool into .xfer*/ parts (install.sh).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MVWORLD_CUDA_ARCHS=${MVWORLD_CUDA_ARCHS:-90a} NCCL_NVLS_ENABLE=0
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > "$OUT/wheels.log" 2>&1 || echo "wheel install FAILED (see wheels.log)"
fi
mkdir -p /tmp/xfer; for d in .xfer*/; do [ -d "$d" ] && cp "$d"part.* /tmp/xfer/ 2>/dev/null; done  # parts carried here
for s in .xfer*/install.sh; do [ -f "$s" ] && bash "$s" >> "$OUT/wheels.log" 2>&1; done
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,temperature.gpu --format=csv,noheader > "$OUT/gpu.txt" 2>&1
(time python3 -m pip install --no-build-isolation --no-deps -e .) > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
python3 - <<'PY' | tee "$OUT/env.txt"
import importlib.metadata as md, torch, mvkernels
print(torch.__version__, torch.cuda.get_device_name(), "build:", mvkernels.build_info())
from mvkernels.ops import fa4_attention
print("  FA4 usable:", fa4_attention.available() or fa4_attention.install_hint())
for name in ("av", "flash-attn-4", "sageattention", "peft", "torchao", "nvidia-cudnn-frontend", "triton"):
    try: print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError: print(f"  {name} not installed")
PY
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  to=""; python3 -c "import pytest_timeout" 2>/dev/null && to="--timeout ${PER_TEST_TIMEOUT:-180}"
  timeout ${TEST_TIMEOUT:-420} python3 -m pytest ${TESTS:--m gpu tests} -q -p no:cacheprovider -rfE $to \
    --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -25
fi
for b in ${@:-mv_attention attention_int8 inference_step dit_block train_step}; do
  f=benches/bench_$b.py; [ -f "$f" ] || { echo "skip $b (no $f)"; continue; }
  echo "== $b"
  timeout ${BENCH_TIMEOUT:-200} python3 -m pytest "$f" -q -s -p no:cacheprovider --benchmark-json="$OUT/$b.json" \
    > "$OUT/$b.log" 2>&1
  grep -vE "^\s*$|warn|Warn|^-+$|Legend|Outliers|OPS|Name \(time|^bench" "$OUT/$b.log" | tail -${BENCH_LINES:-20}
done
