# Helpers shared by the launchers in this directory (sourced, not run).
#
# Every command a launcher runs goes through `run`, which prints it as one shell line prefixed
# with "+ " and then runs it, unless DRY_RUN=1. The printed lines are valid shell: they can be
# copied and run by hand.

DRY_RUN=${DRY_RUN:-0}

die() {  # one-line usage error on stderr, exit status 2 (a newline in it is shown as \n)
  local msg="$*"
  echo "$PROG: error: ${msg//$'\n'/\\n}" >&2
  exit 2
}

warn() {  # one-line warning on stderr
  local msg="$*"
  echo "$PROG: WARNING: ${msg//$'\n'/\\n}" >&2
}

q() {  # quote one word for the shell, leaving plain words (and the --flag= of --flag=value) bare
  # A word with a newline or another control character is written as $'...' (bash), so that
  # every quoted word stays on one line.
  local s=$1 prefix=""
  if [[ $s =~ ^(--[A-Za-z0-9][A-Za-z0-9_.-]*=)(.*)$ ]]; then
    prefix=${BASH_REMATCH[1]}
    s=${BASH_REMATCH[2]}
  fi
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s%s' "$prefix" "$s"
  elif [[ $s == *[[:cntrl:]]* ]]; then
    printf '%s%q' "$prefix" "$s"
  else
    printf "%s'%s'" "$prefix" "${s//\'/\'\\\'\'}"
  fi
}

qjoin() {  # quote every argument and join them with spaces
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(q "$a")"
  done
  printf '%s' "$out"
}

run() {  # run: print "+ LINE", then evaluate LINE (a shell command line) unless dry-running
  echo "+ $1"
  if [[ $DRY_RUN != 1 ]]; then
    eval "$1"
  fi
}

need_value() {  # need_value OPTION ARGC [NEXT]: the option must be followed by a value
  if (($2 < 2)) || [[ -z ${3-} || $3 == --* ]]; then
    die "$1 needs a value"
  fi
}

check_env_pair() {  # --env KEY=VALUE: KEY must be a shell variable name
  [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE with KEY a variable name, got '$1'"
}

check_one_line() {  # check_one_line OPTION VALUE: the value goes on one line of a generated file
  [[ $2 != *$'\n'* ]] || die "$1 must not contain a newline"
}

check_config_exists() {  # check_config_exists FILE[:ARG]: FILE exists (relative to the current directory)
  [[ -f ${1%%:*} ]] || die "--config file not found: ${1%%:*}"
}

is_url() {  # is_url PATH: PATH has a URL scheme (gs://, s3://, ...) rather than being a file path
  [[ $1 =~ ^[A-Za-z][A-Za-z0-9+.-]*:// ]]
}

fs_type() {  # fs_type PATH: type of the file system holding PATH (or its nearest existing parent)
  local p=$1
  [[ $p == /* ]] || p="$PWD/$p"
  while [[ ! -e $p ]]; do p=$(dirname "$p"); done
  stat -f -c %T "$p" 2>/dev/null || true  # empty where stat differs (BSD)
}

is_node_local_fs() {  # is_node_local_fs TYPE: TYPE (from fs_type) is a file system only one host sees
  case $1 in
    ext2/ext3|ext4|xfs|btrfs|zfs|f2fs|jfs|reiserfs|tmpfs|ramfs|devtmpfs|overlayfs|overlay|vfat|msdos|exfat|squashfs) return 0 ;;
    *) return 1 ;;
  esac
}

check_positive_int() {  # check_positive_int OPTION VALUE
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 expects a positive integer, got '$2'"
}

check_port() {
  [[ $1 =~ ^[1-9][0-9]*$ ]] && (($1 <= 65535)) || die "--port expects a port number (1-65535), got '$1'"
}

default_python() {  # the interpreter the trainer runs with when CLIPJAX_TRAIN_CMD is not set
  if command -v python >/dev/null 2>&1; then echo python; else echo python3; fi
}

# The trainer's exit status for "stopped early (SIGTERM, Ctrl-C) with its step saved: run it again
# to resume" (sysexits' EX_TEMPFAIL); 0 is done, 1 a crash, 2 a mistake to fix (docs/launching.md).
RESUME_STATUS=75

resume_loop() {  # resume_loop COMMAND: shell text running COMMAND again while it exits with RESUME_STATUS
  printf 'until %s; do s=$?; [ "$s" -eq %s ] || exit "$s"; echo "clipjax: stopped early (exit status %s), resuming" >&2; done' \
    "$1" "$RESUME_STATUS" "$RESUME_STATUS"
}
