#!/usr/bin/env bash
# Installs Debian/Ubuntu packages as root with apt-get, or says what to install:
#   bash .ci/apt_install.sh "WHAT IS MISSING" SCRIPT PACKAGE...
# (SCRIPT: the installer to run again once root; used by install_slurm.sh, install_cxx.sh).
set -euo pipefail
missing=$1
script=$2
shift 2
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "error: $missing; install $* as root with apt-get (bash $script)" >&2
  exit 1
fi
echo "installing $* ($missing)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q "$@" >/dev/null
