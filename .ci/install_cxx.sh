#!/usr/bin/env bash
# Installs a C++ compiler (g++), which model.attention_impl='cpu_fused' compiles its kernel
# with on first use (tests/test_models_cpu_attention.py). A no-op when $CXX or g++ exists.
# Debian/Ubuntu, as root.
set -euo pipefail
if command -v "${CXX:-g++}" >/dev/null 2>&1; then
  exit 0
fi
exec bash "$(dirname "$0")/apt_install.sh" "no C++ compiler (${CXX:-g++})" .ci/install_cxx.sh g++
