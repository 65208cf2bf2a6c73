#!/usr/bin/env bash
# Train clipjax on GPU nodes of a SLURM cluster; see --help and docs/launching.md.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source=launch/_common.sh
. "$HERE/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG [options] [-- TRAINER FLAGS...]

Write an sbatch script that runs the clipjax trainer as one JAX process per GPU (or per node)
on a SLURM allocation, then submit it with sbatch. Each task exports
  CLIPJAX_COORDINATOR    first node of the allocation (scontrol show hostnames):PORT
  CLIPJAX_NUM_PROCESSES  \$SLURM_NTASKS
  CLIPJAX_PROCESS_ID     \$SLURM_PROCID
  CUDA_VISIBLE_DEVICES   \$SLURM_LOCALID   (per-gpu mode only)
and the trainer joins the others with jax.distributed.initialize. The job runs in the current
directory, with the environment of this shell (activate the virtualenv first, or use --setup).

Options:
  --nodes N              number of nodes (default: 1)
  --gpus-per-node G      GPUs to use on each node (default: 8)
  --partition P          SLURM partition (default: the cluster's default)
  --account A            SLURM account to charge (default: yours)
  --time HH:MM:SS        time limit, in any format sbatch accepts (default: the partition's)
  --job-name NAME        job name (default: clipjax)
  --config FILE[:ARG]    config file with an optional ':arg', relative to the current directory
                         (default: configs/clip_vit_b16.py); FILE must exist
  --workdir DIR          the trainer's --workdir, on storage every node shares
                         (default: runs/NAME); with --nodes > 1, a warning when it is on a
                         node-local file system (ext4, xfs, tmpfs, ...) here
  --mode per-gpu|per-node
                         per-gpu (default): one process per GPU (G tasks per node, each sees
                         only its GPU); per-node: one process per node that drives its G GPUs
  --port PORT            coordinator port on the first node
                         (default: 29500 + SLURM_JOB_ID % 10000, so jobs sharing a node differ)
  --env KEY=VALUE        export KEY=VALUE in the job; repeat for more variables
  --setup COMMAND        shell command run in the job before the trainer starts, e.g.
                         "module load cuda/12.4; source .venv/bin/activate" (written as is)
  --sbatch-arg ARG       extra sbatch option written as an #SBATCH line, e.g. --sbatch-arg
                         --qos=high; one argument each (quoted as needed); repeat for more
  --script FILE          where to write the sbatch script; the job's output goes next to it as
                         NAME-JOBID.out (default: runs/slurm/NAME.sbatch)
  --dry-run              print the commands (and the sbatch script) that would run, each
                         command on one line prefixed with "+ ", and run nothing
  -h, --help             show this help and exit
  -- FLAGS...            everything after -- is passed to the trainer, e.g. --config.steps=1000

Values are quoted in the script (#SBATCH lines as sbatch reads them); the values of --partition,
--account, --time, --job-name, --sbatch-arg and --script must not contain a newline.

Environment:
  CLIPJAX_TRAIN_CMD      trainer command used instead of "python -m clipjax.train"

Examples:
  $PROG --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
      --config configs/clip_vit_b16.py --workdir /shared/runs/clip_b16
  $PROG --nodes 4 --mode per-node --setup "source .venv/bin/activate" --dry-run
EOF
}

nodes=1 gpus=8 partition="" account="" time_limit="" job_name="clipjax"
config="configs/clip_vit_b16.py" workdir="" mode="per-gpu" port="" setup="" script=""
envs=() sbatch_args=() extra=()

while (($#)); do
  [[ $1 != --?*=* ]] || set -- "${1%%=*}" "${1#*=}" "${@:2}"  # --opt=value -> --opt value
  case $1 in
    -h|--help) usage; exit 0 ;;
    --nodes) need_value "$1" $# "${2-}"; check_positive_int "$1" "$2"; nodes=$2; shift 2 ;;
    --gpus-per-node) need_value "$1" $# "${2-}"; check_positive_int "$1" "$2"; gpus=$2; shift 2 ;;
    --partition) need_value "$1" $# "${2-}"; check_one_line "$1" "$2"; partition=$2; shift 2 ;;
    --account) need_value "$1" $# "${2-}"; check_one_line "$1" "$2"; account=$2; shift 2 ;;
    --time) need_value "$1" $# "${2-}"; check_one_line "$1" "$2"; time_limit=$2; shift 2 ;;
    --job-name) need_value "$1" $# "${2-}"; check_one_line "$1" "$2"; job_name=$2; shift 2 ;;
    --config) need_value "$1" $# "${2-}"; config=$2; shift 2 ;;
    --workdir) need_value "$1" $# "${2-}"; workdir=$2; shift 2 ;;
    --mode) need_value "$1" $# "${2-}"; mode=$2; shift 2 ;;
    --port) need_value "$1" $# "${2-}"; check_port "$2"; port=$2; shift 2 ;;
    --env) need_value "$1" $# "${2-}"; check_env_pair "$2"; envs+=("$2"); shift 2 ;;
    --setup) need_value "$1" $# "${2-}"; setup=$2; shift 2 ;;
    --sbatch-arg) (($# >= 2)) || die "$1 needs a value"; check_one_line "$1" "$2"; sbatch_args+=("$2"); shift 2 ;;
    --script) need_value "$1" $# "${2-}"; check_one_line "$1" "$2"; script=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -*) die "unknown option: $1 (see --help)" ;;
    *) die "unexpected argument: $1 (see --help)" ;;
  esac
done

case $mode in
  per-gpu) tasks_per_node=$gpus ;;
  per-node) tasks_per_node=1 ;;
  *) die "--mode must be per-gpu or per-node, got '$mode'" ;;
esac
[[ $time_limit =~ ^[0-9][0-9:-]*$ || -z $time_limit ]] || die "--time expects HH:MM:SS (or D-HH:MM:SS, MM), got '$time_limit'"
[[ $job_name =~ ^[A-Za-z0-9_.+-]+$ ]] || die "--job-name may only use letters, digits and _ . + -, got '$job_name'"
for a in ${sbatch_args[@]+"${sbatch_args[@]}"}; do
  [[ $a == --* || $a == -? ]] || die "--sbatch-arg expects an sbatch option such as --qos=high, got '$a'"
done
[[ -n $workdir ]] || workdir="runs/$job_name"
[[ -n $script ]] || script="runs/slurm/$job_name.sbatch"
check_config_exists "$config"  # the job runs in this directory, so the trainer reads it from here

rundir=$(pwd -P)
[[ $rundir != *$'\n'* ]] || die "the current directory (the job's --chdir) must not contain a newline"
if ((nodes > 1)) && ! is_url "$workdir"; then
  fs=$(fs_type "$workdir")
  if is_node_local_fs "$fs"; then
    warn "--workdir $workdir is on a node-local file system here ($fs), but all $nodes nodes write to it: use a shared file system"
  fi
fi
script_dir=$(dirname "$script")
case $script_dir in /*) out_dir=$script_dir ;; .) out_dir=$rundir ;; *) out_dir="$rundir/$script_dir" ;; esac
if [[ -n $port ]]; then
  port_expr=$port
else
  port_expr='$((29500 + SLURM_JOB_ID % 10000))'
fi
train="${CLIPJAX_TRAIN_CMD:-python -m clipjax.train}"

sq() {  # quote one argument of an #SBATCH line as sbatch splits them: plain words (and the
  # --flag= of --flag=value) bare, others in double quotes with \ and " escaped. sbatch expands
  # nothing there; a newline cannot be written (the options refuse it).
  local s=$1 prefix=""
  if [[ $s =~ ^(--[A-Za-z0-9][A-Za-z0-9_.-]*=)(.*)$ ]]; then
    prefix=${BASH_REMATCH[1]}
    s=${BASH_REMATCH[2]}
  fi
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s%s' "$prefix" "$s"
  else
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    printf '%s"%s"' "$prefix" "$s"
  fi
}

# Every value in the script is quoted: sq on the #SBATCH lines, q (shell quoting) below them.
# --setup is the exception: it is a shell command, written as is.
sbatch_script() {
  echo "#!/bin/bash"
  echo "#SBATCH $(sq "--job-name=$job_name")"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=$tasks_per_node"
  echo "#SBATCH --gres=gpu:$gpus"
  [[ -z $partition ]] || echo "#SBATCH $(sq "--partition=$partition")"
  [[ -z $account ]] || echo "#SBATCH $(sq "--account=$account")"
  [[ -z $time_limit ]] || echo "#SBATCH $(sq "--time=$time_limit")"
  echo "#SBATCH $(sq "--chdir=$rundir")"
  echo "#SBATCH $(sq "--output=$out_dir/%x-%j.out")"
  echo "#SBATCH --requeue"
  echo "#SBATCH --open-mode=append"
  for a in ${sbatch_args[@]+"${sbatch_args[@]}"}; do
    echo "#SBATCH $(sq "$a")"
  done
  echo "# Written by launch/$PROG: $nodes node(s) x $gpus GPU(s), $mode mode," \
    "$((nodes * tasks_per_node)) process(es)."
  echo "set -eo pipefail"
  [[ -z $setup ]] || echo "$setup"
  echo "set -u"
  echo ""
  echo "# The coordinator: the first node of the allocation."
  echo "export CLIPJAX_COORDINATOR=\"\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | sed -n 1p):$port_expr\""
  for pair in ${envs[@]+"${envs[@]}"}; do
    echo "export ${pair%%=*}=$(q "${pair#*=}")"
  done
  echo "echo \"clipjax: \$SLURM_NTASKS processes on \$SLURM_JOB_NUM_NODES node(s), coordinator \$CLIPJAX_COORDINATOR\""
  echo ""
  echo "# One task per process; each one learns its rank from SLURM. A run that stops early with"
  echo "# its step saved (exit status $RESUME_STATUS: SIGTERM at the time limit or a preemption) is"
  echo "# requeued, and resumes. (This shell's own SIGTERM waits for srun: a trap, not an ignore,"
  echo "# which the trainers would inherit.)"
  echo "trap 'echo \"clipjax: SIGTERM received, waiting for the processes to save\" >&2' TERM"
  echo "status=0"
  echo "srun --kill-on-bad-exit=1 --label bash -c '"
  echo "  export CLIPJAX_NUM_PROCESSES=\$SLURM_NTASKS"
  echo "  export CLIPJAX_PROCESS_ID=\$SLURM_PROCID"
  [[ $mode != per-gpu ]] || echo "  export CUDA_VISIBLE_DEVICES=\$SLURM_LOCALID"
  echo "  exec ${train//\'/\'\\\'\'} \"\$@\""
  echo "' clipjax-task $(qjoin --config "$config" --workdir "$workdir" ${extra[@]+"${extra[@]}"}) || status=\$?"
  echo "if [ \"\$status\" -eq $RESUME_STATUS ]; then"
  echo "  echo \"clipjax: stopped early (exit status $RESUME_STATUS), requeueing job \$SLURM_JOB_ID to resume\" >&2"
  echo "  scontrol requeue \"\$SLURM_JOB_ID\""
  echo "fi"
  echo "exit \"\$status\""
}

body=$(sbatch_script)
delimiter=EOF  # ends the here-document of the printed command: a line the script does not have
while grep -qxF -e "$delimiter" <<<"$body"; do delimiter+=_; done
run "$(qjoin mkdir -p "$script_dir")"
echo "+ cat > $(q "$script") <<'$delimiter'"
printf '%s\n' "$body" "$delimiter"
if [[ $DRY_RUN != 1 ]]; then
  printf '%s\n' "$body" > "$script"
fi
run "$(qjoin sbatch "$script")"
if [[ $DRY_RUN != 1 ]]; then
  echo "output: $out_dir/$job_name-JOBID.out; workdir: $workdir"
fi
