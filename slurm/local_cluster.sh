#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost, for tests and CI (see shared notes local-slurm.md).
#
#   slurm/local_cluster.sh start    # install (if missing), configure, start; wait until idle
#   slurm/local_cluster.sh status   # exit 0 and print sinfo when the node is usable
#   slurm/local_cluster.sh stop     # stop the daemons this script started
#
# Must run as root on Debian (no systemd needed: the daemons are started directly).
# Idempotent: `start` on a running cluster only checks it (and resumes a drained node).
# Environment:
#   ALSACE_SLURM_DIR     state/spool/log/pid directory (default /tmp/alsace-slurm)
#   ALSACE_SLURM_WAIT_S  how long `start` waits for the node to become idle (default 60)
# Exit codes: 0 ok; 1 failure (message on stderr); 2 usage; 3 not root / cannot install.
set -euo pipefail

DIR=${ALSACE_SLURM_DIR:-/tmp/alsace-slurm}
WAIT_S=${ALSACE_SLURM_WAIT_S:-60}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)

die() { echo "local_cluster: $*" >&2; exit "${2:-1}"; }
log() { echo "local_cluster: $*" >&2; }

# A pid counts as alive only if it exists and is not a zombie (killed daemons whose parent
# does not reap them linger as Z; `kill -0` would still succeed).
alive() {
  local pid=$1 state
  [[ -n $pid && -r /proc/$pid/stat ]] || return 1
  state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ $state != Z && $state != X ]]
}
pid_of() { [[ -s $1 ]] && cat "$1" || true; }

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  ((${#missing[@]})) || return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them" 3
  log "installing ${missing[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  # --no-install-recommends: ~4 packages instead of ~37.
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    >"$DIR/apt.log" 2>&1 || { tail -n 20 "$DIR/apt.log" >&2; die "apt-get install failed" 3; }
}

start_munge() {
  # The package's postinst creates the key; recreate it if something removed it.
  [[ -s /etc/munge/munge.key ]] || mungekey --create >/dev/null
  # No systemd here: /run/munge is not created for us.
  install -d -o munge -g munge -m 0755 /run/munge
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  runuser -u munge -- /usr/sbin/munged
  touch "$DIR/munge.ours"  # stop only a munged we started
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged does not answer (munge -n | unmunge)"
}

write_conf() {
  # Node topology as slurmd detects it; RealMemory at 95% so that the node is never
  # drained for "low memory" when the detected amount fluctuates.
  local topo mem
  topo=$(slurmd -C | head -n1) || die "slurmd -C failed"
  mem=$(sed -nE 's/.*RealMemory=([0-9]+).*/\1/p' <<<"$topo")
  topo=$(sed -E "s/^NodeName=[^ ]+ //; s/RealMemory=[0-9]+/RealMemory=$((mem * 95 / 100))/" <<<"$topo")
  mkdir -p /etc/slurm "$DIR/state" "$DIR/spool" "$DIR/log"
  cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: one-node test cluster on localhost.
ClusterName=alsace-local
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 $topo State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1 || true; }

wait_idle() {
  local deadline=$((SECONDS + WAIT_S)) state=""
  while ((SECONDS < deadline)); do
    if scontrol ping >/dev/null 2>&1; then
      state=$(node_state)
      case $state in
        idle | mixed | allocated | completing) return 0 ;;
        drain* | drained*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
      esac
    fi
    sleep 0.5
  done
  log "node not idle after ${WAIT_S}s (state: '${state:-unknown}'); last log lines:"
  tail -n 15 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null || true
  die "cluster did not come up"
}

cmd_start() {
  [[ $(id -u) == 0 ]] || die "must run as root (installs packages, writes $CONF)" 3
  mkdir -p "$DIR"
  install_packages
  start_munge
  if alive "$(pid_of "$DIR/slurmctld.pid")" && alive "$(pid_of "$DIR/slurmd.pid")"; then
    wait_idle  # already running: just make sure the node is usable
    log "already running"
    return 0
  fi
  cmd_stop_daemons  # half-up (one daemon dead): restart both from scratch
  write_conf
  slurmctld -c || die "slurmctld failed to start (see $DIR/log/slurmctld.log)"  # -c: clean state
  slurmd || die "slurmd failed to start (see $DIR/log/slurmd.log)"
  wait_idle
  log "up: $(sinfo -h -N -o '%N %T %c CPUs %m MB')"
}

stop_pidfile() {
  local pidfile=$1 pid
  pid=$(pid_of "$pidfile")
  if alive "$pid"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

cmd_stop_daemons() {
  stop_pidfile "$DIR/slurmd.pid"
  stop_pidfile "$DIR/slurmctld.pid"
}

cmd_stop() {
  [[ -d $DIR ]] || { log "not running"; return 0; }
  cmd_stop_daemons
  if [[ -e $DIR/munge.ours ]]; then
    stop_pidfile /run/munge/munged.pid
    rm -f "$DIR/munge.ours"
  fi
  log "stopped"
}

cmd_status() {
  if alive "$(pid_of "$DIR/slurmctld.pid")" && alive "$(pid_of "$DIR/slurmd.pid")" \
    && scontrol ping >/dev/null 2>&1; then
    sinfo -N
    return 0
  fi
  echo "local_cluster: not running" >&2
  return 1
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
