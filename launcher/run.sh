#!/usr/bin/env bash
# Submit a training job to SLURM:  CONFIG=configs/<name>.yaml sbatch [-N NODES] launcher/run.sh [key=value ...]
#
# One torchrun agent per node (srun), rendezvous at the first node over c10d; each agent starts
# NPROC_PER_NODE ranks (default: the node's GPUs, else 1 for CPU nodes; GPUs with a CPU build of torch are
# refused). The job resumes from the newest
# complete checkpoint, so a requeued or resubmitted job continues where it stopped.
#
# Time limit: SLURM sends TERM to each node's torchrun agent GPTFORGE_SIGNAL_LEAD seconds before the limit
# (the --signal line below, default 300). The agent forwards it to its ranks at once and kills them
# GPTFORGE_STOP_GRACE seconds later (torchrun --shutdown-timeout; default: the lead less 30 s, so the
# ranks are gone before SLURM kills the job at the limit). In that grace every rank finishes its step,
# saves it and completes the checkpoint, then exits; the console says how long each part took
# ("... received X s before the end of step N", "checkpoint ... written in Y s"): a grace shorter
# than a step plus a save loses the steps since the previous checkpoint. For a longer lead, pass both:
#   GPTFORGE_SIGNAL_LEAD=900 CONFIG=... sbatch --signal=TERM@900 launcher/run.sh
# (an #SBATCH line cannot read variables; sbatch's own --signal overrides it). SLURM may send the signal
# up to a minute earlier than asked, never later. torchrun alone exits 1 after it forwarded a signal,
# however its ranks ended; the agent here is launcher/torchrun.py, which exits 0 instead when every rank
# of its node stopped cleanly with its checkpoint complete, so such a job ends COMPLETED (afterok
# dependents start; resubmit to continue) and its log says "stop requested by signal". A rank that did
# not stop cleanly in the grace still fails the job.
#SBATCH --job-name=gptforge
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=TERM@300
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

: "${CONFIG:?set CONFIG=configs/<name>.yaml}"
REPO=${GPTFORGE_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PYTHON=${GPTFORGE_PYTHON:-$REPO/.venv/bin/python}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)
  if [ "$NPROC_PER_NODE" -gt 0 ]; then
    # One rank per GPU needs a torch that can use them: a CPU build would run every rank on the CPU.
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || {
      echo "gptforge: this node has $NPROC_PER_NODE GPU(s) but $PYTHON has no CUDA torch" \
           "($("$PYTHON" -c 'import torch; print(torch.__version__)' 2>&1 | tail -n 1)):" \
           "install the CUDA build (GPTFORGE_TORCH=cuda bash launcher/install.sh), or set NPROC_PER_NODE" \
           "to train on the CPU on purpose" >&2
      exit 2
    }
  else
    NPROC_PER_NODE=1
  fi
fi
SIGNAL_LEAD=${GPTFORGE_SIGNAL_LEAD:-300}
[[ "$SIGNAL_LEAD" =~ ^[0-9]+$ ]] \
  || { echo "gptforge: GPTFORGE_SIGNAL_LEAD must be whole seconds, got '$SIGNAL_LEAD'" >&2; exit 2; }
STOP_GRACE=${GPTFORGE_STOP_GRACE:-$((SIGNAL_LEAD > 60 ? SIGNAL_LEAD - 30 : SIGNAL_LEAD / 2))}
[[ "$STOP_GRACE" =~ ^[0-9]+$ ]] && [ "$STOP_GRACE" -gt 0 ] \
  || { echo "gptforge: GPTFORGE_STOP_GRACE must be whole seconds > 0, got '$STOP_GRACE'" >&2; exit 2; }
if [ "$STOP_GRACE" -ge "$SIGNAL_LEAD" ]; then
  echo "gptforge: GPTFORGE_STOP_GRACE=$STOP_GRACE must be shorter than GPTFORGE_SIGNAL_LEAD=$SIGNAL_LEAD" \
       "(SLURM kills the job at the time limit, before the grace ends)" >&2
  exit 2
fi
HEAD_NODE=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
PORT=${GPTFORGE_RDZV_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "gptforge: ${SLURM_NNODES:-1} node(s) x ${NPROC_PER_NODE} rank(s), rendezvous ${HEAD_NODE}:${PORT}, config ${CONFIG}"
echo "gptforge: on the time-limit signal (expected ${SIGNAL_LEAD} s before the limit) the ranks get ${STOP_GRACE} s to save"
cd "$REPO"
srun --kill-on-bad-exit=1 "$PYTHON" -m gptforge.launcher.torchrun \
  --nnodes "${SLURM_NNODES:-1}" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "${HEAD_NODE}:${PORT}" --rdzv-id "${SLURM_JOB_ID:-0}" \
  --shutdown-timeout "$STOP_GRACE" \
  -m gptforge.launcher.cli train --config "$CONFIG" --resume auto "$@"
