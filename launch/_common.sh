# Helpers shared by the launchers in this directory (sourced, not run).
#
# Every command a launcher runs goes through `run`, which prints it as one shell line prefixed
# with "+ " and then runs it, unless DRY_RUN=1. The printed lines are valid shell: they can be
# copied and run by hand.

DRY_RUN=${DRY_RUN:-0}

die() {  # one-line usage error on stderr, exit status 2
  echo "$PROG: error: $*" >&2
  exit 2
}

q() {  # quote one word for the shell, leaving plain words (and the --flag= of --flag=value) bare
  local s=$1 prefix=""
  if [[ $s =~ ^(--[A-Za-z0-9][A-Za-z0-9_.-]*=)(.*)$ ]]; then
    prefix=${BASH_REMATCH[1]}
    s=${BASH_REMATCH[2]}
  fi
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s%s' "$prefix" "$s"
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

check_positive_int() {  # check_positive_int OPTION VALUE
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 expects a positive integer, got '$2'"
}

check_port() {
  [[ $1 =~ ^[1-9][0-9]*$ ]] && (($1 <= 65535)) || die "--port expects a port number (1-65535), got '$1'"
}

default_python() {  # the interpreter the trainer runs with when CLIPJAX_TRAIN_CMD is not set
  if command -v python >/dev/null 2>&1; then echo python; else echo python3; fi
}
