#!/usr/bin/env bash
# Debian packages the server and perf_analyzer need (libb64 for perf_analyzer, libsndfile for soundfile).
set -euo pipefail
need=()
for pkg in libb64-0d libsndfile1; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
