"""A mistake on a command line is one line naming the key or file, and exit status 2: config
files that do not run, values absl cannot parse, files the converter cannot read, a workdir with
nothing to evaluate. Most cases are called in-process; the absl layer needs a real command."""

import os
import pathlib
import subprocess
import sys
import time

import pytest

from clipjax.checkpoint import Checkpointer
from clipjax.cli import check_config_command_line
from clipjax.config import config_json, default_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "pretrained"


def _one_line_exit(capsys, call) -> str:
    with pytest.raises(SystemExit) as info:
        call()
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "source,arg,expected",
    [
        ("def get_config(:\n", "", "{path}: syntax error at line 1: invalid syntax"),
        ("x = 1\n", "", "{path}: defines no get_config() function"),
        ("def get_config():\n    return {}\n", "", "{path}: get_config returned dict, not a ConfigDict"),
        ("import no_such_module_here\n", "", "{path}: the file fails to run (ModuleNotFoundError: "),
        (
            "def get_config():\n    raise RuntimeError('boom')\n",
            "",
            "{path}: get_config failed (RuntimeError: boom)",
        ),
        (
            "def get_config(arg=''):\n    raise ValueError(f'unknown arg {arg!r}')\n",
            ":bogus",
            "{path}:bogus: get_config failed (ValueError: unknown arg 'bogus')",
        ),
    ],
)
def test_a_config_file_that_does_not_run_is_one_line(tmp_path, capsys, source, arg, expected):
    path = tmp_path / "my_config.py"
    path.write_text(source)
    argv = ["train", "--config", f"{path}{arg}", "--workdir", str(tmp_path / "w")]
    line = _one_line_exit(capsys, lambda: check_config_command_line("clipjax.train", argv))
    assert line.startswith("clipjax.train: --config " + expected.format(path=path)), line


def test_the_demo_config_refuses_an_unknown_arg_in_one_line(capsys):
    argv = ["train", "--config", "configs/demo.py:bogus", "--workdir", "w"]
    line = _one_line_exit(capsys, lambda: check_config_command_line("clipjax.train", argv))
    assert line == (
        "clipjax.train: --config configs/demo.py:bogus: get_config failed (ValueError: "
        "configs/demo.py: unknown arg 'bogus' (expected '' or 'tiny'))"
    )


def test_unreadable_checkpoint_files_are_one_line_naming_the_file(tmp_path, capsys):
    from clipjax import convert

    whole = (FIXTURES / "open_clip" / "model.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole[: len(whole) // 2])
    pickle = tmp_path / "model.pt"  # torch missing: "needs torch"; torch present: not a pickle
    pickle.write_bytes(b"not a torch file")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{not json")
    for fmt, checkpoint, reason in (
        ("open_clip", truncated, "cannot be read (SafetensorError: "),
        ("open_clip", pickle, ""),
        ("hf_clip", hf, "cannot be read (JSONDecodeError: "),
    ):
        argv = ["import", "--format", fmt, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]
        line = _one_line_exit(capsys, lambda: convert.main(argv))
        named = checkpoint / "config.json" if checkpoint == hf else checkpoint
        assert line.startswith(f"clipjax.convert: --checkpoint {named}: {reason}"), line
    assert not (tmp_path / "out").exists()


def test_a_reader_leaves_a_save_in_progress_alone(tmp_path):
    """Readers (load, evaluate) open the checkpoints without Orbax's clean-up of temporary
    folders: that would delete a running trainer's save, and, unfinished at exit, it printed a
    traceback after the reader's one-line error."""
    in_progress = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000"
    (in_progress / "state").mkdir(parents=True)
    reader = Checkpointer(str(tmp_path), create=False)
    assert reader.all_steps() == []
    reader.close()
    deadline = time.monotonic() + 1.0  # a clean-up would run in the background: give it time
    while in_progress.is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_progress.is_dir()
    # The trainer (create=True) does clean up, and its close waits until that is done.
    Checkpointer(str(tmp_path)).close()
    assert not in_progress.exists()


@pytest.fixture(scope="module")
def empty_workdir(tmp_path_factory):
    """A workdir whose run has not written a checkpoint yet."""
    workdir = tmp_path_factory.mktemp("empty")
    config = default_config()
    config.data.tokenizer.kind = "byte"  # nothing to train before the checkpoint is looked for
    (workdir / "config.json").write_text(config_json(config))
    (workdir / "checkpoints").mkdir()
    return workdir


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            [
                "clipjax.train",
                "--config",
                "configs/demo.py:tiny",
                "--workdir",
                "{w}/run",
                "--config.steps=abc",
            ],
            "clipjax.train: --config.steps: expected an integer, got 'abc'",
        ),
        (
            ["clipjax.train", "--config", "configs/demo.py:tiny", "--workdir", "{w}/run"]
            + ["--config.data.batch_size=32.5"],
            "clipjax.train: --config.data.batch_size: expected an integer, got '32.5'",
        ),
        (
            ["clipjax.evaluate", "--workdir", "{w}", "--step", "abc"],
            "clipjax.evaluate: --step: expected an integer, got 'abc'",
        ),
        (
            ["clipjax.evaluate", "--workdir", "{w}"],
            "clipjax.evaluate: no checkpoint in {w}/checkpoints",
        ),
    ],
    ids=["steps", "batch_size", "evaluate-step", "evaluate-empty"],
)
def test_command_line_mistakes_are_one_line_and_status_2(empty_workdir, args, expected):
    result = subprocess.run(
        [sys.executable, "-m", *(a.format(w=empty_workdir) for a in args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [expected.format(w=empty_workdir)], result.stderr[-3000:]
    assert not (empty_workdir / "run").exists()


def test_tfds_naming_a_custom_configuration_is_left_off_the_console():
    """Own data is always a configuration tfds was not shipped with; its warning saying so was the
    first of two lines before a refused run's one-line error."""
    import logging

    from clipjax.console import quiet_libraries

    quiet_libraries(verbose=False)
    absl_logger = logging.getLogger("absl")

    def record(path, message):
        return absl_logger.makeRecord("absl", logging.WARNING, path, 1, message, ("x",), None)

    builder = "/venv/site-packages/tensorflow_datasets/core/dataset_builder.py"
    assert not absl_logger.filter(record(builder, "Using custom data configuration: %s"))
    # Everything else from tfds, and the same words from elsewhere, still reach the console.
    assert absl_logger.filter(record(builder, "Dataset %s is corrupted"))
    assert absl_logger.filter(record("/work/clipjax/data/pipeline.py", "Using custom data configuration: %s"))
