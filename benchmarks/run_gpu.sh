#!/usr/bin/env bash
# Every GPU number in benchmarks/RESULTS.md, one command per device call (each fits its 10 minutes):
#
#   bash benchmarks/run_gpu.sh served OUT_DIR   # official 60 s / 27, then benchmarks.bench_triton
#   bash benchmarks/run_gpu.sh engine OUT_DIR   # official at four lengths, then benchmarks.bench_pipeline
#   bash benchmarks/run_gpu.sh lowvram OUT_DIR  # benchmarks.bench_lowvram: the lowvram profile at 60 s and
#                                               # 240 s, GPU memory per server process (~6 minutes)
#
# The official pipeline runs first, in the same call on the same GPU, when its code is present
# (refs/ace/acestep, git-ignored, with ../shared/bench/official_pipeline_bench.py copied to refs/ and
# its wheels in .whl_official/: ../shared/bench/README.md). It runs under the image's own Python
# (numpy 2: diffusers 0.33.1 imports the image's jax, built for numpy 2). ACESTEP_COMMIT names the commit measured
# (the device machine gets no .git). Extra arguments after OUT_DIR go to our benchmark.
set -euo pipefail
part="$1"; out="$2"; shift 2
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
mkdir -p "$out"
commit="${ACESTEP_COMMIT:-unknown}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

case "$part" in
  served) official_configs="60:27:3,240:27:2" ;;
  engine) official_configs="60:27:3,60:60:3,240:27:3,240:60:2" ;;
  lowvram) exec "$ACESTEP_PY" -m benchmarks.bench_lowvram --out "$out" --commit "$commit" "$@" ;;
  *) echo "usage: run_gpu.sh served|engine|lowvram OUT_DIR [benchmark arguments]" >&2; exit 2 ;;
esac

if [ -f refs/ace/acestep/pipeline_ace_step.py ] && [ -f refs/official_pipeline_bench.py ]; then
  "$ACESTEP_IMAGE_PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/official-site .whl_official/*.whl
  PATH="$(dirname "$ACESTEP_IMAGE_PY"):$PATH" PYTHONPATH=/tmp/official-site HF_HUB_OFFLINE=1 ACESTEP_REF=refs/ace \
    "$ACESTEP_IMAGE_PY" refs/official_pipeline_bench.py --configs "$official_configs" --warm 1 \
    --out "$out/official" > "$out/official.log" 2>&1 || echo "official pipeline failed: see official.log"
  grep -E "^(RESULT|DONE)" "$out/official.log" | cut -c1-200 || true
else
  echo "official pipeline not measured: refs/ace/acestep or refs/official_pipeline_bench.py missing"
fi

if [ "$part" = served ]; then
  "$ACESTEP_PY" -m benchmarks.bench_triton --out "$out" --commit "$commit" "$@"
else
  "$ACESTEP_PY" -m benchmarks.bench_pipeline --out "$out" --commit "$commit" "$@"
fi
