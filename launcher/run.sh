#!/usr/bin/env bash
# Submit a training job to SLURM:  CONFIG=configs/<name>.yaml sbatch [-N NODES] launcher/run.sh [key=value ...]
#
# One torchrun agent per node (srun), rendezvous at the first node over c10d; each agent starts
# NPROC_PER_NODE ranks (default: the node's GPUs, else 1 for CPU nodes). The job resumes from the newest
# complete checkpoint, so a requeued or resubmitted job continues where it stopped; SLURM's TERM
# two minutes before the time limit makes every rank save a checkpoint and exit cleanly.
#SBATCH --job-name=gptforge
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=TERM@120
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

: "${CONFIG:?set CONFIG=configs/<name>.yaml}"
REPO=${GPTFORGE_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PYTHON=${GPTFORGE_PYTHON:-$REPO/.venv/bin/python}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
HEAD_NODE=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
PORT=${GPTFORGE_RDZV_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "gptforge: ${SLURM_NNODES:-1} node(s) x ${NPROC_PER_NODE} rank(s), rendezvous ${HEAD_NODE}:${PORT}, config ${CONFIG}"
cd "$REPO"
srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run \
  --nnodes "${SLURM_NNODES:-1}" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "${HEAD_NODE}:${PORT}" --rdzv-id "${SLURM_JOB_ID:-0}" \
  -m gptforge.launcher.cli train --config "$CONFIG" --resume auto "$@"
