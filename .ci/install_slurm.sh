#!/usr/bin/env bash
# Installs SLURM (Debian's slurm-wlm: slurmctld, slurmd, sbatch, srun, ...) and munge,
# which tests/test_launch_slurm.py needs: it starts its own munged, slurmctld and slurmd
# on localhost. A no-op when they are installed. Debian/Ubuntu, as root.
set -euo pipefail
PATH="$PATH:/usr/sbin:/sbin"
missing=()
for tool in sbatch srun scontrol squeue scancel slurmctld slurmd munged; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "error: SLURM is not installed (no ${missing[*]}); install slurm-wlm and munge" \
    "as root with apt-get (bash .ci/install_slurm.sh)" >&2
  exit 1
fi
echo "installing slurm-wlm and munge (missing: ${missing[*]})"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q slurm-wlm munge >/dev/null
