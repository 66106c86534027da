#!/usr/bin/env bash
# ALSACE with XLM-R large (ZeRO-2, bf16) on a multi-node GPU Slurm cluster.
#
#   sbatch slurm/alsace_xlmr.sh [--config FILE] [key=value ...]      # from the repository root
#
# Launch: one srun task per node running torchrun, one rank per GPU on every node (no ssh).
# Run directory: runs/alsace-xlmr-<job id> unless you pass run.output_dir=...
# Environment (exported to the job by sbatch):
#   CONFIG=FILE        config file (same as --config FILE; a --config argument wins)
#   NPROC_PER_NODE=N   ranks per node (default: the GPUs Slurm gives each node)
#   LAUNCHER=torchrun  default; `mpi`: srun one task per GPU (--mpi=$SRUN_MPI, default pmix)
#                      with DeepSpeed's MPI discovery (needs mpi4py); `mpirun`: Open MPI's mpirun
#   ALSACE_CPU=1       CPU-only allocation: DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1 (without it,
#                      an inherited DS_ACCELERATOR=cpu is refused: a GPU job never runs on CPU)
#   LAUNCHERS_PER_NODE=K  simulate K nodes per node (tests; submit with --ntasks-per-node=K)
#   ALSACE_DRY_RUN=1   print the launch command and exit 0 (checks the allocation wiring)
#   MASTER_PORT=P      rendezvous port (default 20000 + job id % 20000)
#   ALSACE_ROOT=DIR    repository root (default: the submit directory)
# CPU test on a GPU-less cluster: command-line options override the #SBATCH lines, e.g.
#   ALSACE_CPU=1 NPROC_PER_NODE=2 sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2 \
#     slurm/alsace_xlmr.sh model.name_or_path=embedded model.dtype=fp32 ...
# (`--gpus-per-node=0` is accepted; `--gres=none` is refused by Slurm 22.05.)
#
# Which ZeRO stage / offload fits your GPUs, and how many you need:
#   python -m alsace_ds.tools.plan --model xlm-roberta-large --nodes 1 --gpus-per-node 8 --gpu-mem 80
# --- Edit for your cluster (partition/account lines: add `#SBATCH --partition=...` etc.) ---
#SBATCH --job-name=alsace-xlmr
#SBATCH --nodes=1
# one Slurm task per node: torchrun inside it starts one rank per GPU
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
# cores for all ranks of a node (data loading, tokenisation, ZeRO CPU work)
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
# %x = job name, %j = job id (the run directory is named with the same id)
#SBATCH --output=slurm-%x-%j.out
# Preemption and time limit: USR1 to the batch shell 300 s before the end; every rank stops at
# its next poll and commits, the job requeues itself and resumes from there. A TERM at the
# limit itself (no USR1 in time) does the same; a scancel is never requeued (slurm/common.sh).
# --open-mode=append keeps the first attempt's log in the output file.
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail

# sbatch runs a spooled copy of this file, so find the repository from the submit directory.
REPO=${ALSACE_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
[[ -f $REPO/slurm/common.sh ]] || { echo "submit from the repository root (or set ALSACE_ROOT)" >&2; exit 1; }

RUN_NAME=${RUN_NAME:-alsace-xlmr}
# The xlm-roberta-large preset; the user's key=value arguments come after it and win.
PRESET=(model.family=xlmr model.name_or_path=xlm-roberta-large model.dtype=bf16
  deepspeed.config=ds_configs/zero2.json)
# shellcheck source=common.sh
source "$REPO/slurm/common.sh"
