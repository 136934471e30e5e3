#!/usr/bin/env bash
# Installs a C++ compiler (g++), which model.attention_impl='cpu_fused' compiles its kernel
# with on first use (tests/test_models_cpu_attention.py). A no-op when $CXX or g++ exists.
# Debian/Ubuntu, as root.
set -euo pipefail
if command -v "${CXX:-g++}" >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "error: no C++ compiler (${CXX:-g++}); install g++ as root with apt-get" \
    "(bash .ci/install_cxx.sh)" >&2
  exit 1
fi
echo "installing g++"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q g++ >/dev/null
