#!/usr/bin/env bash
# Train clipjax on a Cloud TPU VM (single host or pod slice); see --help and docs/launching.md.
set -euo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$HERE/.." && pwd -P)
# shellcheck source=launch/_common.sh
. "$HERE/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --tpu NAME --zone ZONE --workdir gs://BUCKET/DIR [options] [-- TRAINER FLAGS...]

Train clipjax on every worker of a Cloud TPU VM (one host or a multi-host pod slice):
  1. create the TPU VM (--create), or check that it exists;
  2. pack this checkout (tracked files and untracked files that git does not ignore) into a
     tarball and copy it to every worker (gcloud compute tpus tpu-vm scp --worker=all);
  3. unpack it on every worker and install it: pip install -e ".[tpu,buckets]" (the pinned jax
     and libtpu that python -m clipjax.plan compiles with, and gcsfs for the gs:// workdir);
  4. run the trainer on every worker at once (gcloud compute tpus tpu-vm ssh --worker=all),
     and again on a worker where it stops early with exit status 75 (SIGTERM, e.g. a
     maintenance event: its step is saved), so that the run resumes.
On a multi-host slice the trainer joins the other workers with jax.distributed.initialize(),
which finds them by itself. Every step is printed, prefixed with "+ ", before it runs.

Required:
  --tpu NAME             name of the TPU VM
  --zone ZONE            its zone, e.g. us-central2-b
  --workdir DIR          the trainer's --workdir: checkpoints, metrics, report.json. Every worker
                         writes to it, so it must be storage that all of them share (gs://...);
                         a path without a URL scheme gets a warning unless the slice created
                         with --create has a single host (e.g. v4-8)

Options:
  --project PROJECT      Google Cloud project (default: gcloud's configured project)
  --accelerator TYPE     accelerator type for --create (default: v4-32)
  --version VERSION      TPU software version for --create (default: tpu-ubuntu2204-base)
  --create               create the TPU VM first (gcloud compute tpus tpu-vm create); without
                         it the TPU VM must exist already and is reused
  --config FILE[:ARG]    config file inside this repository, with an optional ':arg'
                         (default: configs/clip_vit_b16.py); FILE must exist
  --env KEY=VALUE        export KEY=VALUE on every worker before the trainer starts; repeat for
                         more variables
  --remote-dir DIR       where the code goes on each worker, relative to the home directory
                         unless absolute (default: clipjax)
  --python PYTHON        Python interpreter on the workers, used for the install and the run
                         (default: python3). clipjax needs Python >= 3.11; see --setup.
  --setup COMMAND        shell command run on every worker before the install, e.g. to install
                         a newer Python (inserted into the remote command as written)
  --skip-setup           do not copy or install anything: run the code already installed in
                         --remote-dir (after a first launch)
  --detach               start the trainer in the background on every worker (nohup) and
                         return at once; each worker logs to REMOTE_DIR/logs/train.log. Without
                         it the command stays attached and streams every worker's output.
  --dry-run              print every command that would run, one per line prefixed with "+ ",
                         and run nothing
  -h, --help             show this help and exit
  -- FLAGS...            everything after -- is passed to the trainer, e.g. --config.steps=1000

Environment:
  CLIPJAX_TRAIN_CMD      trainer command used on the workers instead of
                         "PYTHON -m clipjax.train" (inserted as written)

Examples:
  $PROG --tpu my-v4 --zone us-central2-b --create --workdir gs://my-bucket/clip_b16
  $PROG --tpu my-v4 --zone us-central2-b --workdir gs://my-bucket/clip_b16 --skip-setup \\
      --env WANDB_MODE=offline -- --config.steps=20000
EOF
}

tpu="" zone="" project="" accelerator="v4-32" version="tpu-ubuntu2204-base" create=0
config="configs/clip_vit_b16.py" workdir="" remote_dir="clipjax" python="python3" setup=""
skip_setup=0 detach=0 create_only=""
envs=() extra=()

while (($#)); do
  [[ $1 != --?*=* ]] || set -- "${1%%=*}" "${1#*=}" "${@:2}"  # --opt=value -> --opt value
  case $1 in
    -h|--help) usage; exit 0 ;;
    --tpu) need_value "$1" $# "${2-}"; tpu=$2; shift 2 ;;
    --zone) need_value "$1" $# "${2-}"; zone=$2; shift 2 ;;
    --project) need_value "$1" $# "${2-}"; project=$2; shift 2 ;;
    --accelerator) need_value "$1" $# "${2-}"; accelerator=$2; create_only=$1; shift 2 ;;
    --version) need_value "$1" $# "${2-}"; version=$2; create_only=$1; shift 2 ;;
    --create) create=1; shift ;;
    --config) need_value "$1" $# "${2-}"; config=$2; shift 2 ;;
    --workdir) need_value "$1" $# "${2-}"; workdir=$2; shift 2 ;;
    --env) need_value "$1" $# "${2-}"; check_env_pair "$2"; envs+=("$2"); shift 2 ;;
    --remote-dir) need_value "$1" $# "${2-}"; remote_dir=$2; shift 2 ;;
    --python) need_value "$1" $# "${2-}"; python=$2; shift 2 ;;
    --setup) need_value "$1" $# "${2-}"; setup=$2; shift 2 ;;
    --skip-setup) skip_setup=1; shift ;;
    --detach) detach=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -*) die "unknown option: $1 (see --help)" ;;
    *) die "unexpected argument: $1 (see --help)" ;;
  esac
done

[[ -n $tpu ]] || die "--tpu is required (see --help)"
[[ -n $zone ]] || die "--zone is required (see --help)"
[[ -n $workdir ]] || die "--workdir is required: storage every worker can write, e.g. gs://BUCKET/DIR"
if [[ -n $create_only ]] && ((!create)); then
  echo "$PROG: note: $create_only only matters with --create; the existing TPU VM is used as it is" >&2
fi
if ((create && skip_setup)); then
  die "--create and --skip-setup do not go together: a new TPU VM has nothing installed"
fi

# The config is read on the workers from the copied checkout: pass it relative to the repository.
config_file=${config%%:*}
config_arg=""
[[ $config == *:* ]] && config_arg=":${config#*:}"
if [[ -f $config_file ]]; then
  abs="$(cd "$(dirname "$config_file")" && pwd -P)/$(basename "$config_file")"
  [[ $abs == "$REPO"/* ]] || die "--config $config_file is outside the repository, which is what gets copied to the workers"
  config="${abs#"$REPO"/}$config_arg"
elif [[ $config_file == /* || ! -f $REPO/$config_file ]]; then
  die "--config file not found: $config_file"
fi

# Every worker writes to the workdir: a path on a worker's own disk is not seen by the others.
# The workers of a slice: one host up to 8 cores/chips (v4-8, v5litepod-8, ...), several above.
# A TPU VM that is not created here may be of any size.
if ! is_url "$workdir"; then
  if ((!create)); then
    hosts="the TPU VM may have several workers"
  elif [[ $accelerator =~ -([0-9]+)$ ]] && ((BASH_REMATCH[1] <= 8)); then
    hosts=""
  else
    hosts="a $accelerator slice has several workers"
  fi
  [[ -z $hosts ]] || warn "--workdir $workdir is not a bucket and $hosts, each with its own disk: use gs://BUCKET/DIR (or a file system mounted on every worker)"
fi

where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")
tpuvm=(gcloud compute tpus tpu-vm)

# Values embedded in the remote shell commands are quoted with printf %q.
printf -v r_dir %q "$remote_dir"
remote_tar=clipjax-code.tar.gz
local_tar="${TMPDIR:-/tmp}/clipjax-code-$tpu.tar.gz"

exports=""
for pair in ${envs[@]+"${envs[@]}"}; do
  printf -v value %q "${pair#*=}"
  exports+="export ${pair%%=*}=$value; "
done
train="${CLIPJAX_TRAIN_CMD:-$python -m clipjax.train}"
for a in --config "$config" --workdir "$workdir" ${extra[@]+"${extra[@]}"}; do
  printf -v a %q "$a"
  train+=" $a"
done

# 1. The TPU VM.
if ((create)); then
  run "$(qjoin "${tpuvm[@]}" create "$tpu" "${where[@]}" --accelerator-type="$accelerator" --version="$version")"
else
  run "$(qjoin "${tpuvm[@]}" describe "$tpu" "${where[@]}" --format='value(state)')"
fi

# 2-3. Code and packages on every worker.
if ((!skip_setup)); then
  if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    run "(cd $(q "$REPO") && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $(q "$local_tar"))"
  else
    run "tar -C $(q "$REPO") --exclude=.git --exclude=.venv --exclude=runs --exclude=data -czf $(q "$local_tar") ."
  fi
  [[ $DRY_RUN == 1 ]] || trap 'rm -f "$local_tar"' EXIT  # also when a step fails
  run "$(qjoin "${tpuvm[@]}" scp "$local_tar" "$tpu:$remote_tar" "${where[@]}" --worker=all)"
  install="set -e; mkdir -p $r_dir; tar -xzf $remote_tar -C $r_dir; rm -f $remote_tar; cd $r_dir; "
  if [[ -n $setup ]]; then
    install+="{ $setup; } || { echo \"--setup failed\" >&2; exit 1; }; "
  fi
  install+="$python -c \"import sys; sys.exit(sys.version_info < (3, 11))\" || "
  install+="{ echo \"clipjax needs Python >= 3.11 (use --python, --setup)\" >&2; exit 1; }; "
  install+="$python -m pip install -e \".[tpu,buckets]\""
  run "$(qjoin "${tpuvm[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$install")"
  run "$(qjoin rm -f "$local_tar")"
fi

# 4. The trainer, on every worker at once; started again on a worker whose run stopped early
# (exit status 75: a maintenance event's SIGTERM), where it resumes from the checkpoint it saved.
train=$(resume_loop "$train")
if ((detach)); then
  printf -v train %q "$train"
  remote="set -e; cd $r_dir; mkdir -p logs; ${exports}nohup bash -c $train > logs/train.log 2>&1 < /dev/null &"
else
  remote="set -e; cd $r_dir; ${exports}$train"
fi
run "$(qjoin "${tpuvm[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$remote")"
if ((detach)); then
  echo "started on every worker of $tpu; each worker logs to $remote_dir/logs/train.log (under its home directory unless absolute)"
fi
