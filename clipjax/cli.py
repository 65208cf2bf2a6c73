"""What the command lines share: one-line errors, and a check of `--config.*` override keys.

A mistake the user can fix (a config file or key, a flag's value, a workdir, the data) is
printed as one line naming what is wrong, and the command exits with status 2; any other error
prints its type and message first, then a pointer to the traceback, and exits with status 1.
`--verbose` (or CLIPJAX_VERBOSE=1) prints tracebacks. A run stopped by SIGTERM or Ctrl-C after
saving its step exits with RESUME_EXIT_STATUS (the same command resumes it); a Ctrl-C anywhere
else, 130.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import traceback
from typing import Callable

import ml_collections
from absl import flags

from clipjax.checkpoint import CheckpointWriteError, one_line
from clipjax.config import ConfigError, LEGACY_KEYS, flatten
from clipjax.data.drops import BadDataError
from clipjax.pretrained.layouts import ConversionError
from clipjax.run_store.record import RestoreError
from clipjax.schema import suggest
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
    """`configs/x.py` or `configs/x.py:arg` -> its get_config(arg). Whatever goes wrong in the
    user's file (a syntax error, no get_config, get_config raising) is a ConfigError naming it."""
    path, arg = spec, ""
    if not os.path.exists(path) and ":" in spec:
        path, arg = spec.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"--config: file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location("_clipjax_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"--config {path}: syntax error at line {e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - any error running the user's file is theirs to fix
        raise ConfigError(f"--config {path}: the file fails to run ({one_line(e)})") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"--config {path}: defines no get_config() function")
    try:
        config = get_config(arg) if arg else get_config()
    except Exception as e:  # noqa: BLE001 - the file's own checks (an unknown :arg) included
        detail = str(e).strip().splitlines()[0] if isinstance(e, ConfigError) else one_line(e)
        raise ConfigError(f"--config {spec}: get_config failed ({detail})") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"--config {spec}: get_config returned {type(config).__name__}, not a ConfigDict "
            "(start from clipjax.config.default_config())"
        )
    return config


# absl's reasons for a value it cannot parse, as the schema words them.
_FLAG_REASONS = (
    ("invalid literal for int()", "expected an integer"),
    ("could not convert string to float", "expected a number"),
    ("Non-boolean argument", "expected True or False"),
)


def flag_error_line(error: Exception) -> str:
    """absl's `flag --name=value: reason` as '--name: what was expected, got value'."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    match = re.fullmatch(r"flag (--[^=\s]+)=(.*?): (.*)", text)
    if not match:
        return text
    name, value, reason = match.groups()
    for needle, wording in _FLAG_REASONS:
        if needle in reason:
            return f"{name}: {wording}, got {value!r}"
    return f"{name}: {reason}"


def flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
    """For `app.run(..., flags_parser=...)`: a flag absl cannot parse (`--config.steps=abc`,
    `--step abc`, an unknown flag) is one line and exit status 2, not absl's FATAL and 1."""

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(prog, flag_error_line(e))

    return parse


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
        close = suggest(key, known)
        hint = f" (did you mean '{close}'?)" if close else ""
        raise ConfigError(f"--config.{key}: unknown key{hint}")
