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
exec bash "$(dirname "$0")/apt_install.sh" "SLURM is not installed (no ${missing[*]})" \
  .ci/install_slurm.sh slurm-wlm munge
