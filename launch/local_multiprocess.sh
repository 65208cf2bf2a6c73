#!/usr/bin/env bash
# Run N clipjax trainer processes on this machine, as a multi-host run would; see --help.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=launch/_common.sh
. "$HERE/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG N [options] [-- TRAINER FLAGS...]

Start N clipjax trainer processes on this machine, on CPU, joined into one JAX run through a
coordinator on 127.0.0.1, exactly as the hosts of a multi-host run are: each process gets
  CLIPJAX_COORDINATOR=127.0.0.1:PORT  CLIPJAX_NUM_PROCESSES=N  CLIPJAX_PROCESS_ID=i
  CLIPJAX_LOCAL_DEVICES=D  JAX_PLATFORMS=cpu
Process i logs to WORKDIR/logs/process_i.log. The launcher waits for all of them; when one
fails it stops the others and exits with that process's status. Ctrl-C stops them all. A
run that stops early with its step saved (exit status 75: a process got SIGTERM or Ctrl-C
of its own) is started again, and resumes.

Arguments:
  N                          number of processes (a positive integer)

Options:
  --devices-per-process D    virtual CPU devices per process (default: 1); the run has N x D
                             devices, which the config's mesh and batch size must fit
  --port PORT                coordinator port on 127.0.0.1 (default: a free port)
  --config FILE[:ARG]        config file with an optional ':arg' (default: configs/demo.py);
                             FILE must exist, relative to the current directory
  --workdir DIR              the trainer's --workdir, a local directory (default: runs/local)
  --env KEY=VALUE            set KEY=VALUE for every process; repeat for more variables
  --dry-run                  print the commands that would run, one per line prefixed with
                             "+ ", and run nothing
  -h, --help                 show this help and exit
  -- FLAGS...                everything after -- is passed to the trainer, e.g.
                             --config.steps=20

Environment:
  CLIPJAX_TRAIN_CMD          trainer command used instead of "python -m clipjax.train" (a
                             command and its arguments; the trainer flags are appended)

Examples:
  $PROG 2 --devices-per-process 4 --config configs/demo.py:tiny --workdir runs/mp_tiny
  $PROG 4 --workdir runs/mp4 -- --config.steps=100
EOF
}

n="" devices=1 port="" config="configs/demo.py" workdir="runs/local"
envs=() extra=()

while (($#)); do
  [[ $1 != --?*=* ]] || set -- "${1%%=*}" "${1#*=}" "${@:2}"  # --opt=value -> --opt value
  case $1 in
    -h|--help) usage; exit 0 ;;
    --devices-per-process) need_value "$1" $# "${2-}"; check_positive_int "$1" "$2"; devices=$2; shift 2 ;;
    --port) need_value "$1" $# "${2-}"; check_port "$2"; port=$2; shift 2 ;;
    --config) need_value "$1" $# "${2-}"; config=$2; shift 2 ;;
    --workdir) need_value "$1" $# "${2-}"; workdir=$2; shift 2 ;;
    --env) need_value "$1" $# "${2-}"; check_env_pair "$2"; envs+=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -*) die "unknown option: $1 (see --help)" ;;
    *)
      [[ -z $n ]] || die "unexpected argument: $1 (N is already $n; see --help)"
      [[ $1 =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$1'"
      n=$1; shift ;;
  esac
done
[[ -n $n ]] || die "the number of processes N is required, e.g. $PROG 2 (see --help)"
[[ $workdir != *://* ]] || die "--workdir must be a local directory here (logs go to WORKDIR/logs), got '$workdir'"
check_config_exists "$config"  # the processes run in this directory

python=$(default_python)
free_port() {
  "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
train="${CLIPJAX_TRAIN_CMD:-$python -m clipjax.train}"
logdir="$workdir/logs"

pids=()
finished=()  # finished[i]: the exit status of process i, once collected
stop_all() {  # stop_all SIGNAL: signal every process not yet collected
  local j
  for ((j = 0; j < ${#pids[@]}; j++)); do
    [[ -n ${finished[j]-} ]] || kill "-$1" "${pids[j]}" 2>/dev/null || true
  done
}
on_signal() {  # Ctrl-C or kill: stop the processes, wait for them, exit 128+signal
  trap - INT TERM
  echo "$PROG: $1 received, stopping all processes" >&2
  stop_all TERM
  wait || true
  exit "$2"
}
on_exit() {  # never leave processes behind, whatever ends the launcher
  stop_all KILL
}

run "$(qjoin mkdir -p "$logdir")"
trap 'on_signal SIGINT 130' INT
trap 'on_signal SIGTERM 143' TERM
trap on_exit EXIT
# Started again, all of them, when the run stops early (exit status 75: a process got SIGTERM or
# Ctrl-C on its own, and saved its step), so that it resumes; the launcher's own Ctrl-C ends it.
while :; do
  pids=() finished=()
  coordinator="127.0.0.1:${port:-$(free_port)}"
  for ((i = 0; i < n; i++)); do
    line="env CLIPJAX_COORDINATOR=$coordinator CLIPJAX_NUM_PROCESSES=$n CLIPJAX_PROCESS_ID=$i"
    line+=" CLIPJAX_LOCAL_DEVICES=$devices JAX_PLATFORMS=cpu"
    for pair in ${envs[@]+"${envs[@]}"}; do
      line+=" ${pair%%=*}=$(q "${pair#*=}")"
    done
    line+=" $train $(qjoin --config "$config" --workdir "$workdir" ${extra[@]+"${extra[@]}"})"
    line+=" > $(q "$logdir/process_$i.log") 2>&1 &"
    run "$line"
    [[ $DRY_RUN == 1 ]] || pids+=("$!")
  done
  echo "+ wait"
  [[ $DRY_RUN != 1 ]] || exit 0

  echo "$n processes started (coordinator $coordinator); logs: $logdir/process_*.log"
  # Collect the processes as they finish. The first failure stops the others (a process left
  # alone would wait forever for its peers in a collective) and becomes the launcher's status.
  first_status=0
  remaining=$n
  stop_deadline=0
  while ((remaining > 0)); do
    for ((i = 0; i < n; i++)); do
      [[ -z ${finished[i]-} ]] || continue
      if kill -0 "${pids[i]}" 2>/dev/null; then
        continue  # still running
      fi
      status=0
      wait "${pids[i]}" || status=$?
      finished[i]=$status
      remaining=$((remaining - 1))
      if ((status == RESUME_STATUS && first_status == 0)); then
        first_status=$status  # the others stop at the same step (they are told so by JAX)
        echo "$PROG: process $i stopped early, its step saved (exit status $status)" >&2
        stop_deadline=$((SECONDS + 120))
      elif ((status != 0 && first_status == 0)); then
        first_status=$status
        echo "$PROG: process $i exited with status $status; stopping the others. Last lines of $logdir/process_$i.log:" >&2
        tail -n 20 "$logdir/process_$i.log" | sed 's/^/  | /' >&2 || true
        stop_all TERM
        stop_deadline=$((SECONDS + 10))
      elif ((status == 0)); then
        echo "process $i finished"
      fi
    done
    if ((remaining > 0)); then
      if ((stop_deadline > 0 && SECONDS >= stop_deadline)); then
        stop_all KILL  # still there 10 s after SIGTERM (or 120 s after a peer stopped early)
      fi
      sleep 0.2
    fi
  done
  ((first_status == RESUME_STATUS)) || break
  echo "$PROG: the run stopped early (exit status $RESUME_STATUS); starting the processes again to resume" >&2
done
if ((first_status == 0)); then
  echo "all $n processes finished"
fi
exit "$first_status"
