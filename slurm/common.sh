# shellcheck shell=bash
# Shared launcher logic of slurm/alsace_*.sh (sourced, not run). Inputs (set by the caller):
#   RUN_NAME   prefix of the default run directory  runs/<RUN_NAME>-<job id>
#   PRESET     array of key=value overrides of the preset (the user's overrides come after)
#   "$@"       the user's arguments: key=value overrides and/or --config FILE
# Environment a user may set (see the header of alsace_mt5.sh):
#   CONFIG, NPROC_PER_NODE, LAUNCHER (torchrun|mpi|mpirun), ALSACE_CPU, ALSACE_DRY_RUN,
#   MASTER_PORT, PYTHON, SRUN_MPI, LAUNCHERS_PER_NODE.

die() { echo "alsace-slurm: $*" >&2; exit 1; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm allocation: submit with sbatch"

# --- Python: the repository's venv if there is one (batch jobs start with a bare PATH) ---
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=$(command -v python3) || die "no python (set PYTHON=...)"

# --- Processes per node: one per GPU. Slurm announces the GPUs as SLURM_GPUS_ON_NODE (set
# when GPUs are bound) or SLURM_GPUS_PER_NODE (the literal request, e.g. "a100:4").
# NPROC_PER_NODE overrides both (CPU tests, or to use fewer GPUs than allocated).
gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
gpus=${gpus##*:}  # strip a type prefix "a100:4" -> "4"
GPUS_PER_NODE=${NPROC_PER_NODE:-$gpus}
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] \
  || die "no GPUs per node known (got '$GPUS_PER_NODE'): request --gpus-per-node or set NPROC_PER_NODE"
NNODES=${SLURM_NNODES:-1}
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-$GPUS_PER_NODE}
# torchrun launchers per allocated node (1 on a real cluster). K > 1 simulates K nodes on each
# node, e.g. two "nodes" of 2 ranks on a one-node test cluster: submit with
# --ntasks-per-node=K; each launcher is one srun task and its node rank is the task's rank.
LAUNCHERS_PER_NODE=${LAUNCHERS_PER_NODE:-1}
[[ $LAUNCHERS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "LAUNCHERS_PER_NODE must be >= 1"

# --- CPU-only allocation: DeepSpeed's CPU accelerator (gloo); one thread per rank, since
# more threads per rank only contend for the cores. On GPUs: split the task's cores.
if [[ ${ALSACE_CPU:-0} == 1 ]]; then
  # ALSACE_ALLOW_CPU: the ranks refuse the CPU when they see GPUs unless it is meant.
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 ALSACE_ALLOW_CPU=1
else
  # A GPU job must not inherit the CPU accelerator from the submitting shell (it would train
  # on the CPU, ~100x slower, and look fine).
  [[ ${DS_ACCELERATOR:-} != cpu ]] \
    || die "DS_ACCELERATOR=cpu is set (inherited from the submitting shell?) in a GPU job: unset it, or set ALSACE_CPU=1 for a CPU-only job"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((CPUS_PER_TASK / GPUS_PER_NODE > 0 ? CPUS_PER_TASK / GPUS_PER_NODE : 1))}
fi
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false} PYTHONUNBUFFERED=1

# --- Rendezvous: the first node of the allocation hosts rank 0; the port is derived from the
# job id so that two jobs sharing a node do not collide (overridable by MASTER_PORT).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT

# --- Training arguments: --config (CONFIG env; a --config argument wins), the preset, then
# the user's overrides (later keys win), and a run directory named after the job unless the
# user gave one. --config is pulled out and put first: argparse takes no options between
# the positional overrides.
USER_ARGS=()
has_output_dir=0
while (($#)); do
  case $1 in
    --config) (($# >= 2)) || die "--config needs a file"; CONFIG=$2; shift 2; continue ;;
    --config=*) CONFIG=${1#--config=} ;;
    run.output_dir=*) has_output_dir=1; USER_ARGS+=("$1") ;;
    *) USER_ARGS+=("$1") ;;
  esac
  shift
done
ARGS=()
[[ -n ${CONFIG:-} ]] && ARGS+=(--config "$CONFIG")
ARGS+=("${PRESET[@]}")
((${#USER_ARGS[@]})) && ARGS+=("${USER_ARGS[@]}")
((has_output_dir)) || ARGS+=("run.output_dir=runs/${RUN_NAME}-${SLURM_JOB_ID}")

TRAIN=alsace_ds/train.py
LAUNCHER=${LAUNCHER:-torchrun}
case $LAUNCHER in
  torchrun)
    # One srun task per node (LAUNCHERS_PER_NODE per node when simulating); each runs
    # torchrun, which starts GPUS_PER_NODE ranks there. No ssh needed (unlike the deepspeed
    # launcher's pdsh). The node rank is the task's rank (= SLURM_NODEID with one task per
    # node), expanded inside each task, hence the bash -c. torchrun itself ignores USR1 (the
    # ranks, which install their own handler, act on it); by default USR1 would kill the agent.
    CMD=(srun --nodes="$NNODES" --ntasks-per-node="$LAUNCHERS_PER_NODE"
      --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1
      bash -c 'trap "" USR1; exec "$0" -m torch.distributed.run --node_rank "$SLURM_PROCID" "$@"' "$PYTHON"
      --nnodes $((NNODES * LAUNCHERS_PER_NODE)) --nproc_per_node "$GPUS_PER_NODE"
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
      "$TRAIN" "${ARGS[@]}")
    ;;
  mpi)
    # One srun task per GPU, MPI-launched (PMIx); DeepSpeed's auto_mpi_discovery (mpi4py,
    # Open MPI's OMPI_COMM_WORLD_* variables) fills RANK/WORLD_SIZE/LOCAL_RANK. Note that
    # discovery sets MASTER_ADDR from rank 0's `hostname -I` and MASTER_PORT to 29500.
    CMD=(srun --nodes="$NNODES" --ntasks-per-node="$GPUS_PER_NODE"
      --cpus-per-task=$((CPUS_PER_TASK / GPUS_PER_NODE > 0 ? CPUS_PER_TASK / GPUS_PER_NODE : 1))
      --overcommit --mpi="${SRUN_MPI:-pmix}" --kill-on-bad-exit=1
      "$PYTHON" "$TRAIN" "${ARGS[@]}")
    ;;
  mpirun)
    # Open MPI's mpirun starts its daemons through Slurm (no ssh), GPUS_PER_NODE per node.
    CMD=(mpirun -np $((NNODES * GPUS_PER_NODE)) --map-by "ppr:${GPUS_PER_NODE}:node"
      --oversubscribe --allow-run-as-root -x DS_ACCELERATOR -x OMP_NUM_THREADS -x PYTHONUNBUFFERED
      "$PYTHON" "$TRAIN" "${ARGS[@]}")
    ;;
  *) die "LAUNCHER must be torchrun, mpi or mpirun (got '$LAUNCHER')" ;;
esac
if [[ $LAUNCHER != torchrun ]]; then
  "$PYTHON" -c "import mpi4py" 2>/dev/null \
    || [[ ${ALSACE_DRY_RUN:-0} == 1 ]] \
    || die "LAUNCHER=$LAUNCHER needs mpi4py in $PYTHON (pip install mpi4py)"
fi

echo "alsace-slurm: job $SLURM_JOB_ID nodes=$SLURM_JOB_NODELIST nnodes=$NNODES launchers_per_node=$LAUNCHERS_PER_NODE" \
  "nproc_per_node=$GPUS_PER_NODE master=$MASTER_ADDR:$MASTER_PORT launcher=$LAUNCHER" \
  "cpu=${ALSACE_CPU:-0}"
echo "alsace-slurm: command: $(printf '%q ' "${CMD[@]}")"
if [[ ${ALSACE_DRY_RUN:-0} == 1 ]]; then
  echo "alsace-slurm: dry run, not launching"
  exit 0
fi

cd "$REPO"
# Preemption and the time limit. Slurm sends USR1 to this shell (`--signal=B:USR1@300`, or a
# user's `scancel --signal=USR1 --batch`); we pass it to every process of the job's steps. At
# the time limit (or a scancel) Slurm itself sends TERM to this shell and to every step
# process, and SIGKILL KillWait seconds later (30 s by default). Either way each rank only
# sets a flag; all ranks agree at their next poll (optimizer step, or every few batches of an
# evaluation, selection or export), commit a checkpoint (or keep the finished results) and
# exit 75, and rank 0 writes ALSACE_STOP_FILE: torchrun reports any failing rank as exit 1,
# so that file, not the exit code, says "stopped on request". The job requeues itself only
# then, and only for USR1, the time limit or a preemption, never for a user's scancel or a
# crash. The next start resumes (run.resume=auto, same run directory: it is named after the
# job id, which a requeue keeps). The launcher runs in the background so that the traps
# fire at once rather than after it exits.
export ALSACE_STOP_FILE=${TMPDIR:-/tmp}/alsace-stop-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}
rm -f "$ALSACE_STOP_FILE"
signalled=""
on_usr1() {
  signalled=USR1
  echo "alsace-slurm: USR1: every rank stops at its next poll and commits, then the job requeues" >&2
  scancel --signal=USR1 "$SLURM_JOB_ID" || kill -USR1 "$pid"
}
on_term() {
  # Not forwarded: Slurm sends TERM to every step process itself, and a second TERM would cut
  # short torchrun's 30 s wait for its ranks' commit.
  signalled=${signalled:-TERM}
  echo "alsace-slurm: TERM: every rank stops at its next poll and commits" >&2
}
"${CMD[@]}" &
pid=$!
trap on_usr1 USR1
trap on_term TERM
rc=0
while :; do
  wait "$pid" && rc=0 || rc=$?
  # wait also returns (status > 128) when a trapped signal arrives: keep waiting then.
  kill -0 "$pid" 2>/dev/null || break
done
if [[ -s $ALSACE_STOP_FILE ]]; then
  why=$(scontrol show job -o "$SLURM_JOB_ID" | grep -o 'Reason=[A-Za-z]*' || true)
  echo "alsace-slurm: the ranks stopped on request: $(cat "$ALSACE_STOP_FILE")" >&2
  rm -f "$ALSACE_STOP_FILE"
  if [[ $signalled == USR1 || $why == Reason=TimeLimit || $why == Reason=Preempt* ]]; then
    echo "alsace-slurm: requeueing job $SLURM_JOB_ID (${signalled:-no signal}, ${why:-Reason=?})" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "alsace-slurm: not requeued (${signalled:-no signal}, ${why:-Reason=?}): run the job again to resume" >&2
  exit 75
fi
exit "$rc"
