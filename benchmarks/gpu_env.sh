#!/usr/bin/env bash
# Set up the GPU machine for the benchmarks, in one command (source it: it exports the variables).
#
#   source benchmarks/gpu_env.sh
#
# The GPU image has Python 3.12, torch, transformers and numpy 2. The python-backend stub of
# nvidia-pytriton 0.7.0 is built against numpy 1, runs its embedded Python isolated (PYTHONPATH is
# ignored) and takes its prefix, hence its site-packages, from the first `python3` on PATH. So the
# server and everything that starts it run in a virtual environment over the image's packages with
# numpy 1.26 in place of numpy 2 (and without scipy, scikit-learn and numba, which need numpy 2);
# torch and transformers work with numpy 1.26. The project is installed into that environment (a
# .pth file naming the checkout), so the stubs import `acestep_triton` wherever the server starts.
#
# Carried from the developer machine (git-ignored; benchmarks/RESULTS.md says how they are made):
#   .whl/          wheels the image lacks (diffusers, lyric normalisation, soundfile, the gateway's)
#   .whl_server/   py3langid 0.2.2 and numpy 1.26.4 (cp312; the wheel unpacked, its tests left out,
#                  as tar.xz: 8 MB instead of 18, for the 64 MiB a device call carries)
#   .bench_assets/ tritonserver.tar.xz (server, python backend, 3.12 stub, tritonclient) and the
#                  lyric vocabulary
# Exports: ACESTEP_PY (the environment's python3), ACESTEP_IMAGE_PY (the image's own python3, numpy 2),
# PATH (the environment's bin first), PYTORCH_CUDA_ALLOC_CONF.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
env_dir=/tmp/acestep-env
image_python="$(command -v python3)"
image_site="$("$image_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

if [ ! -x "$env_dir/bin/python3" ]; then
  "$image_python" -m venv --without-pip "$env_dir"
  env_site="$("$env_dir/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # Our packages first, then the image's, each as a link: nothing of the image is copied.
  "$image_python" -m pip install -q --no-index --no-deps --no-compile --target "$env_site" \
    "$repo"/.whl/*.whl "$repo"/.whl_server/*.whl
  tar -xJf "$repo"/.whl_server/numpy-*.tar.xz -C "$env_site"
  if [ -f "$repo/.bench_assets/tritonserver.tar.xz" ]; then  # in-process benchmarks need no server
    tar -xJf "$repo/.bench_assets/tritonserver.tar.xz" -C "$env_site"
  fi
  for entry in "$image_site"/*; do
    name="$(basename "$entry")"
    case "$name" in
      numpy|numpy-*|numpy.libs|scipy|scipy-*|scipy.libs|sklearn|scikit_learn*|numba|numba-*|\
      py3langid|py3langid-*|__pycache__) continue ;;
    esac
    [ -e "$env_site/$name" ] || ln -s "$entry" "$env_site/$name"
  done
  echo "$repo" > "$env_site/acestep_triton_checkout.pth"
fi

export ACESTEP_PY="$env_dir/bin/python3"
export ACESTEP_IMAGE_PY="$image_python"
export PATH="$env_dir/bin:$PATH"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export PYTHONUNBUFFERED=1
"$ACESTEP_PY" -c 'import numpy, torch, transformers, diffusers, acestep_triton
print(f"acestep env: numpy {numpy.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}, cuda {torch.cuda.is_available()}")'
