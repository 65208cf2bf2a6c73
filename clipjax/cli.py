"""What the command lines share: one-line errors, and a check of `--config.*` override keys.

A mistake the user can fix (a config key, a workdir, the data) is printed as one line naming
what is wrong, and the command exits with status 2; any other error prints its type and message
first, then a pointer to the traceback, and exits with status 1. `--verbose` (or
CLIPJAX_VERBOSE=1) prints tracebacks. A run stopped by SIGTERM or Ctrl-C after saving its step
exits with RESUME_EXIT_STATUS (the same command resumes it); a Ctrl-C anywhere else, 130.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
import traceback
from typing import Callable

from clipjax.api import RestoreError
from clipjax.checkpoint import CheckpointWriteError, one_line
from clipjax.config import ConfigError, LEGACY_KEYS, flatten
from clipjax.data.pipeline import BadDataError
from clipjax.pretrained.layouts import ConversionError
from clipjax.trainer.hooks import StoppedEarly
from clipjax.workdir_lock import WorkdirLockedError

# "Stopped early, resume me" (sysexits' EX_TEMPFAIL: try again later): unlike 0 (done), 1 (a
# crash) and 2 (a mistake to fix), retrying the same command is what to do (docs/launching.md).
RESUME_EXIT_STATUS = 75
INTERRUPTED_EXIT_STATUS = 130  # 128 + SIGINT, as shells report a Ctrl-C

# Errors whose message is the whole story: no traceback helps the user.
USER_ERRORS = (
    ConfigError,
    RestoreError,
    WorkdirLockedError,
    CheckpointWriteError,
    BadDataError,
    ConversionError,
    FileNotFoundError,
    FileExistsError,
)


def verbose(argv=None) -> bool:
    return "--verbose" in (argv or sys.argv) or os.environ.get("CLIPJAX_VERBOSE", "") not in ("", "0")


def fail(prog: str, message: str, status: int = 2):
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(status)


def run_reporting_errors(prog: str, body: Callable[[], None]) -> None:
    """Run `body`; errors become one line on stderr and a non-zero exit."""
    try:
        body()
    except SystemExit:
        raise
    except StoppedEarly as e:
        fail(prog, str(e), RESUME_EXIT_STATUS)
    except KeyboardInterrupt:
        fail(prog, "interrupted (Ctrl-C)", INTERRUPTED_EXIT_STATUS)
    except USER_ERRORS as e:
        if verbose():
            traceback.print_exc()
        fail(prog, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    except Exception as e:  # noqa: BLE001 - the real error first, then where to see more
        if verbose():
            traceback.print_exc()
        else:
            print(f"{prog}: error: {one_line(e, limit=1000)}", file=sys.stderr)
            print(f"{prog}: (run with --verbose or CLIPJAX_VERBOSE=1 for the traceback)", file=sys.stderr)
        sys.exit(1)


def flag_value(argv: list[str], name: str) -> str | None:
    """The value of `--name=V` or `--name V` on the command line, read before absl parses it."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_config_command_line(prog: str, argv: list[str], required: dict[str, str] | None = None) -> None:
    """Config-file and override-key mistakes (and missing `required` flags: name -> what to give)
    as one line, before absl parses (and traces) them."""
    spec = flag_value(argv, "config")
    if spec is None:
        fail(prog, "--config is required (a configs/*.py file, optionally file.py:arg)")
    for name, hint in (required or {}).items():
        if flag_value(argv, name) is None:
            fail(prog, f"--{name} is required ({hint})")
    try:
        check_override_keys(argv, load_config_file(spec))
    except ConfigError as e:
        fail(prog, str(e))


def load_config_file(spec: str):
    """`configs/x.py` or `configs/x.py:arg` -> its get_config(arg); one-line errors."""
    path, arg = spec, ""
    if not os.path.exists(path) and ":" in spec:
        path, arg = spec.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location("_clipjax_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def check_override_keys(argv: list[str], config) -> None:
    """Every `--config.a.b=...` names a field of `config`; else one line with the closest key."""
    known = set(flatten(config))
    sections = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].split("=", 1)[0]
        if key in known or key in LEGACY_KEYS:
            continue
        if key in sections:
            raise ConfigError(
                f"--config.{key}: is a section; set one of its fields (--config.{key}.FIELD=...)"
            )
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = sorted(k for k in known if k.rsplit(".", 1)[0] == parent) if parent else []
        close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6) or difflib.get_close_matches(
            key, sorted(known), n=1, cutoff=0.6
        )
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"--config.{key}: unknown key{hint}")
