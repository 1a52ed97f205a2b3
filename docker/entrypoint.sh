#!/usr/bin/env bash
# Container start. `serve` (default): check the mounted checkpoint, make what ACESTEP_PROFILE needs
# into the cache volume (ONNX graphs for onnx and tensorrt, engines for tensorrt: both cached, so
# only the first start pays), write the model repository, then run tritonserver in the foreground.
# Any other command runs as given (the gateway service runs `python3 -m gateway`).
set -euo pipefail

CHECKPOINT=${ACESTEP_CHECKPOINT_PATH:-/checkpoint}
CACHE=${ACESTEP_CACHE_DIR:-/cache}
PROFILE=${ACESTEP_PROFILE:-gpu}
REPOSITORY="$CACHE/model_repository/$PROFILE"

if [ "${1:-serve}" != serve ]; then
  exec "$@"
fi

case "$PROFILE" in
  cpu|gpu) extra=() ;;
  onnx) extra=(--onnx-dir "$CACHE/onnx") ;;
  tensorrt) extra=(--onnx-dir "$CACHE/onnx" --engine-dir "$CACHE/engines") ;;
  *) echo "ACESTEP_PROFILE must be cpu, gpu, onnx or tensorrt, got '$PROFILE'" >&2; exit 2 ;;
esac

python3 -c "import sys; from acestep_triton.checkpoint import validate_checkpoint; validate_checkpoint(sys.argv[1])" \
  "$CHECKPOINT"
if [ "$PROFILE" = onnx ] || [ "$PROFILE" = tensorrt ]; then
  python3 -m export.onnx_export --checkpoint "$CHECKPOINT" --out "$CACHE/onnx"
fi
if [ "$PROFILE" = tensorrt ]; then
  python3 -m export.tensorrt_build --checkpoint "$CHECKPOINT" --onnx-dir "$CACHE/onnx" --out "$CACHE/engines" \
    --precision "${ACESTEP_TRT_PRECISION:-bf16}"
fi
python3 -m export.build_repository --profile "$PROFILE" --checkpoint "$CHECKPOINT" --out "$REPOSITORY" "${extra[@]}"
exec tritonserver --model-repository="$REPOSITORY" --http-port=8000 --grpc-port=8001 --metrics-port=8002
