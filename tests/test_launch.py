"""The launchers in launch/: options, dry runs, quoting, and (with stand-ins for gcloud, SLURM and
the trainer) what they really run. Nothing here starts the trainer or reaches a network."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import stat
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_pod.sh"
SLURM = LAUNCH / "gpu_slurm.sh"
LOCAL = LAUNCH / "local_multiprocess.sh"

# A stand-in trainer: writes its arguments, working directory and the launch environment to
# $STUB_OUT/<something unique>.json, then exits with $STUB_EXIT_<process id> (default 0) after
# sleeping $STUB_SLEEP_<process id> seconds. $STUB_EXITS_<process id>="75,0" gives each of its
# runs its own status, in order (the last one for every run after).
STUB_TRAINER = textwrap.dedent("""\
    import json, os, sys, time, uuid
    pid = os.environ.get("CLIPJAX_PROCESS_ID", "x")
    keys = [k for k in os.environ if k.startswith(("CLIPJAX_", "CUDA_", "JAX_", "MY_"))]
    record = {"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: os.environ[k] for k in keys},
              "pid": os.getpid()}
    name = f"{pid}-{uuid.uuid4().hex}.json"
    with open(os.path.join(os.environ["STUB_OUT"], name), "w") as f:
        json.dump(record, f)
    print("stub trainer", pid, "started", flush=True)
    time.sleep(float(os.environ.get(f"STUB_SLEEP_{pid}", "0")))
    statuses = os.environ.get(f"STUB_EXITS_{pid}", "").split(",")
    runs = len([n for n in os.listdir(os.environ["STUB_OUT"]) if n.startswith(f"{pid}-")])
    if statuses != [""]:
        sys.exit(int(statuses[min(runs, len(statuses)) - 1]))
    sys.exit(int(os.environ.get(f"STUB_EXIT_{pid}", "0")))
    """)

TRICKY = 'it\'s a "test" with $HOME and `ticks` & more'


def gone(pid: int, wait_s: float = 10.0) -> bool:
    """Whether process `pid` has exited (waiting up to wait_s for it)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if (
            pathlib.Path(f"/proc/{pid}/stat").exists()
            and ") Z " in pathlib.Path(f"/proc/{pid}/stat").read_text()
        ):
            return True  # a zombie: exited, not yet reaped
        time.sleep(0.1)
    return False


def sh(script, *args, cwd=None, env=None, timeout=60):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        ["bash", str(script), *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def plus_lines(out: str) -> list[str]:
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]


def make_executable(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def stub(tmp_path):
    """CLIPJAX_TRAIN_CMD for the stand-in trainer, and a reader for what its runs recorded."""
    out = tmp_path / "stub_out"
    out.mkdir()
    script = tmp_path / "stub_trainer.py"
    script.write_text(STUB_TRAINER)

    def records():
        return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]

    env = {
        "CLIPJAX_TRAIN_CMD": f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}",
        "STUB_OUT": str(out),
    }
    return env, records


@pytest.fixture
def configs_here(tmp_path):
    """The repository's config files under tmp_path/configs, for launchers run from tmp_path (the
    trainer reads --config relative to the directory it runs in, so the launchers check it there)."""
    (tmp_path / "configs").mkdir(exist_ok=True)
    for path in (REPO / "configs").glob("*.py"):
        (tmp_path / "configs" / path.name).write_text(path.read_text())
    return tmp_path / "configs"


# --- --help -------------------------------------------------------------------------------------

OPTIONS = {
    TPU: [
        "--tpu",
        "--zone",
        "--project",
        "--accelerator",
        "--version",
        "--create",
        "--config",
        "--workdir",
        "--env",
        "--remote-dir",
        "--python",
        "--setup",
        "--skip-setup",
        "--detach",
        "--dry-run",
        "--help",
        "CLIPJAX_TRAIN_CMD",
    ],
    SLURM: [
        "--nodes",
        "--gpus-per-node",
        "--partition",
        "--account",
        "--time",
        "--job-name",
        "--config",
        "--workdir",
        "--mode",
        "per-gpu",
        "per-node",
        "--port",
        "--env",
        "--setup",
        "--sbatch-arg",
        "--script",
        "--dry-run",
        "--help",
        "CLIPJAX_TRAIN_CMD",
    ],
    LOCAL: [
        "--devices-per-process",
        "--port",
        "--config",
        "--workdir",
        "--env",
        "--dry-run",
        "--help",
        "CLIPJAX_TRAIN_CMD",
    ],
}


@pytest.mark.parametrize("script", list(OPTIONS), ids=lambda p: p.name)
def test_help_mentions_every_option(script):
    for flag in ("--help", "-h"):
        r = sh(script, flag)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("Usage: "), r.stdout
        for option in OPTIONS[script]:
            assert option in r.stdout, f"{script.name} --help does not mention {option}"
        assert r.stderr == ""


@pytest.mark.parametrize("script", list(OPTIONS), ids=lambda p: p.name)
def test_options_parsed_are_the_options_documented(script):
    """Every --option the parser accepts is in --help, and the other way round."""
    import re

    source = script.read_text()
    parsed = set(re.findall(r"^\s+(--[a-z][a-z-]*)\)", source, flags=re.M))
    help_text = sh(script, "--help").stdout
    documented = set(re.findall(r"^  (--[a-z][a-z-]*)", help_text, flags=re.M))
    assert parsed == documented


# --- TPU pod ------------------------------------------------------------------------------------


def test_tpu_dry_run_create_copies_installs_and_runs_on_all_workers(tmp_path):
    r = sh(
        TPU,
        "--tpu",
        "my-tpu",
        "--zone",
        "us-central2-b",
        "--project",
        "my-proj",
        "--create",
        "--accelerator",
        "v4-64",
        "--config",
        "configs/demo.py:tiny",
        "--workdir",
        "gs://bucket/run 1",
        "--env",
        "MY_A=1",
        "--env",
        f"MY_B={TRICKY}",
        "--dry-run",
        "--",
        "--config.steps=7",
        cwd=tmp_path,
        env={"TMPDIR": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    lines = plus_lines(r.stdout)
    assert len(lines) == 6, r.stdout
    create, pack, scp, install, cleanup, train = lines
    where = "--zone=us-central2-b --project=my-proj"
    assert create == (
        f"gcloud compute tpus tpu-vm create my-tpu {where} "
        "--accelerator-type=v4-64 --version=tpu-ubuntu2204-base"
    )
    tarball = str(tmp_path / "clipjax-code-my-tpu.tar.gz")
    assert "git ls-files" in pack and "tar " in pack and tarball in pack
    assert scp == f"gcloud compute tpus tpu-vm scp {tarball} my-tpu:clipjax-code.tar.gz {where} --worker=all"
    assert install.startswith(f"gcloud compute tpus tpu-vm ssh my-tpu {where} --worker=all --command=")
    install_cmd = shlex.split(install)[-1].removeprefix("--command=")
    assert "tar -xzf clipjax-code.tar.gz -C clipjax" in install_cmd
    assert install_cmd.endswith('python3 -m pip install -e ".[tpu,buckets]"')
    assert cleanup == f"rm -f {tarball}"
    assert train.startswith(f"gcloud compute tpus tpu-vm ssh my-tpu {where} --worker=all --command=")
    train_cmd = shlex.split(train)[-1].removeprefix("--command=")
    assert "cd clipjax;" in train_cmd and "export MY_A=1;" in train_cmd and "export MY_B=" in train_cmd
    assert (
        r"until python3 -m clipjax.train --config configs/demo.py:tiny "
        r"--workdir gs://bucket/run\ 1 --config.steps=7; do" in train_cmd
    )
    # A dry run runs nothing.
    assert not (tmp_path / "clipjax-code-my-tpu.tar.gz").exists()


def test_tpu_dry_run_reuse_and_skip_setup(tmp_path):
    r = sh(
        TPU,
        "--tpu=old-tpu",
        "--zone=europe-west4-a",
        "--workdir=gs://b/w",
        "--skip-setup",
        "--dry-run",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    lines = plus_lines(r.stdout)
    assert len(lines) == 2, r.stdout
    assert lines[0].startswith("gcloud compute tpus tpu-vm describe old-tpu --zone=europe-west4-a")
    assert "--project" not in r.stdout and " create " not in r.stdout and " scp " not in r.stdout
    assert " --worker=all " in lines[1]
    assert "--config configs/clip_vit_b16.py --workdir gs://b/w" in lines[1]


def test_tpu_detach_runs_in_background_with_a_log(tmp_path):
    r = sh(TPU, "--tpu", "t", "--zone", "z", "--workdir", "gs://b/w", "--skip-setup", "--detach", "--dry-run")
    assert r.returncode == 0, r.stderr
    command = shlex.split(plus_lines(r.stdout)[-1])[-1].removeprefix("--command=")
    assert "nohup " in command and command.endswith("> logs/train.log 2>&1 < /dev/null &")


def test_tpu_config_is_passed_relative_to_the_repository(tmp_path):
    r = sh(
        TPU,
        "--tpu",
        "t",
        "--zone",
        "z",
        "--workdir",
        "gs://b/w",
        "--config",
        f"{REPO}/configs/demo.py:tiny",
        "--dry-run",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "--config configs/demo.py:tiny " in r.stdout
    outside = tmp_path / "mine.py"
    outside.write_text("")
    r = sh(TPU, "--tpu", "t", "--zone", "z", "--workdir", "gs://b/w", "--config", outside, "--dry-run")
    assert r.returncode == 2 and "outside the repository" in r.stderr


def test_tpu_remote_command_delivers_values_intact(tmp_path, stub):
    """Run the printed remote command in a shell, as a worker would: the trainer gets every
    value byte for byte (spaces, quotes, $, backticks are not interpreted)."""
    env, records = stub
    r = sh(
        TPU,
        "--tpu",
        "t",
        "--zone",
        "z",
        "--workdir",
        f"gs://b/{TRICKY}",
        "--config",
        "configs/demo.py",
        "--env",
        f"MY_B={TRICKY}",
        "--env",
        "MY_EMPTY=",
        "--skip-setup",
        "--remote-dir",
        "code dir",
        "--dry-run",
        "--",
        f"--config.name={TRICKY}",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    command = shlex.split(plus_lines(r.stdout)[-1])[-1].removeprefix("--command=")
    home = tmp_path / "home"
    (home / "code dir").mkdir(parents=True)
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=home,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    [record] = records()
    assert record["argv"] == [
        "--config",
        "configs/demo.py",
        "--workdir",
        f"gs://b/{TRICKY}",
        f"--config.name={TRICKY}",
    ]
    assert record["env"]["MY_B"] == TRICKY and record["env"]["MY_EMPTY"] == ""
    assert record["cwd"] == str(home / "code dir")


@pytest.mark.parametrize(
    "statuses, runs, final", [("75,0", 2, 0), ("75,75,2", 3, 2), ("2", 1, 2), ("1", 1, 1), ("0", 1, 0)]
)
def test_tpu_workers_start_a_run_that_stopped_early_again(tmp_path, stub, statuses, runs, final):
    """Exit status 75 (stopped early, step saved: a maintenance event's SIGTERM) starts the
    trainer again on the worker, to resume; 0 (done), 2 (a mistake) or 1 (a crash) end it."""
    env, records = stub
    for detach in (False, True):
        for record in (tmp_path / "stub_out").iterdir():
            record.unlink()
        r = sh(
            TPU,
            "--tpu",
            "t",
            "--zone",
            "z",
            "--workdir",
            "gs://b/w",
            "--skip-setup",
            "--dry-run",
            *(["--detach"] if detach else []),
            env=env,
        )
        assert r.returncode == 0, r.stderr
        command = shlex.split(plus_lines(r.stdout)[-1])[-1].removeprefix("--command=")
        home = tmp_path / "home"
        (home / "clipjax").mkdir(parents=True, exist_ok=True)
        if detach:  # the loop, as nohup runs it in the background
            command = command.replace("nohup ", "", 1).removesuffix(" &")
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=home,
            env={**os.environ, **env, "STUB_EXITS_x": statuses},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == final, done.stderr
        assert len(records()) == runs
        log = (home / "clipjax" / "logs" / "train.log").read_text() if detach else done.stderr
        assert log.count("stopped early (exit status 75), resuming") == runs - 1 - (final == 75)


FAKE_GCLOUD = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stand-in for gcloud compute tpus tpu-vm: one worker whose home is $FAKE_HOME.
    set -euo pipefail
    printf '%s\\n' "$*" >> "$FAKE_LOG"
    case $4 in
      describe) echo READY ;;
      create) ;;
      scp) cp "$5" "$FAKE_HOME/${6#*:}" ;;
      ssh)
        for a in "$@"; do
          case $a in --command=*) cd "$FAKE_HOME" && exec bash -c "${a#--command=}" ;; esac
        done ;;
      *) echo "fake gcloud: unexpected $*" >&2; exit 1 ;;
    esac
    """)

FAKE_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stand-in for the workers' Python: records pip installs, runs everything else.
    if [[ $1 == -m && $2 == pip ]]; then printf '%s\\n' "$*" >> "$FAKE_PIP_LOG"; exit 0; fi
    exec "$REAL_PYTHON" "$@"
    """)


@pytest.fixture
def fake_tpu(tmp_path, stub):
    """Environment with a stand-in gcloud (one worker, home in tmp_path/home) and trainer."""
    env, records = stub
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    make_executable(bin_dir / "gcloud", FAKE_GCLOUD)
    fake_python = make_executable(tmp_path / "fakepy", FAKE_PYTHON)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **env,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_HOME": str(home),
        "FAKE_LOG": str(tmp_path / "gcloud.log"),
        "FAKE_PIP_LOG": str(tmp_path / "pip.log"),
        "REAL_PYTHON": sys.executable,
        "TMPDIR": str(tmp_path),
    }
    return env, records, home, fake_python


def test_tpu_real_run_with_a_stand_in_gcloud(tmp_path, fake_tpu):
    """Everything for real except gcloud: the code reaches the worker, is installed and trained."""
    env, records, home, fake_python = fake_tpu
    r = sh(
        TPU,
        "--tpu",
        "t",
        "--zone",
        "z",
        "--workdir",
        "gs://b/w",
        "--python",
        fake_python,
        "--setup",
        "echo ran > setup.txt && test -f clipjax/train.py",
        "--env",
        "MY_A=a b",
        "--",
        "--config.steps=3",
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    calls = (tmp_path / "gcloud.log").read_text().splitlines()
    assert [c.split()[3] for c in calls] == ["describe", "scp", "ssh", "ssh"]
    code = home / "clipjax"
    assert (code / "clipjax" / "train.py").is_file() and (code / "launch" / "tpu_pod.sh").is_file()
    assert not (code / ".venv").exists() and not (code / ".git").exists()
    assert not (home / "clipjax-code.tar.gz").exists() and not (tmp_path / "clipjax-code-t.tar.gz").exists()
    assert (code / "setup.txt").read_text() == "ran\n"
    assert (tmp_path / "pip.log").read_text().split() == ["-m", "pip", "install", "-e", ".[tpu,buckets]"]
    [record] = records()
    assert record["cwd"] == str(code)
    assert record["argv"] == [
        "--config",
        "configs/clip_vit_b16.py",
        "--workdir",
        "gs://b/w",
        "--config.steps=3",
    ]
    assert record["env"]["MY_A"] == "a b"


def test_a_venv_runs_or_data_symlink_is_not_shipped(tmp_path):
    """tpu_pod.sh ships what `git ls-files --others --exclude-standard` lists: a `.venv`, `runs` or
    `data` that is a symlink (to a shared environment, a mounted bucket) is a file to git, which
    a `.venv/` pattern does not match."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text((REPO / ".gitignore").read_text())
    target = tmp_path / "elsewhere"
    target.mkdir()
    for name in (".venv", "runs", "data"):
        (tmp_path / name).symlink_to(target)
    (tmp_path / "train.py").write_text("")
    listed = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard", "--", ".venv", "runs", "data", "train.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert listed == ["train.py"]


@pytest.mark.parametrize(
    "failure, message",
    [
        (["--setup", "false && true"], "--setup failed"),
        (["--python", "python3.9999"], "clipjax needs Python >= 3.11"),
    ],
)
def test_tpu_failed_install_stops_before_training(tmp_path, fake_tpu, failure, message):
    env, records, home, fake_python = fake_tpu
    r = sh(
        TPU,
        "--tpu",
        "t",
        "--zone",
        "z",
        "--workdir",
        "gs://b/w",
        "--python",
        fake_python,
        *failure,
        env=env,
        timeout=120,
    )
    assert r.returncode != 0
    assert message in r.stderr
    assert records() == []
    assert not (tmp_path / "pip.log").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--zone", "z", "--workdir", "gs://b/w"], "--tpu is required"),
        (["--tpu", "t", "--workdir", "gs://b/w"], "--zone is required"),
        (["--tpu", "t", "--zone", "z"], "--workdir is required"),
        (["--tpu", "t", "--zone", "z", "--workdir", "gs://b/w", "--bogus"], "unknown option: --bogus"),
        (["--tpu", "t", "--zone", "z", "--workdir", "gs://b/w", "stray"], "unexpected argument: stray"),
        (["--tpu", "--zone", "z"], "--tpu needs a value"),
        (["--tpu", "t", "--zone", "z", "--workdir", "gs://b/w", "--env", "1X=2"], "--env expects KEY=VALUE"),
        (
            ["--tpu", "t", "--zone", "z", "--workdir", "gs://b/w", "--create", "--skip-setup"],
            "do not go together",
        ),
    ],
)
def test_tpu_bad_arguments(args, message):
    r = sh(TPU, *args, "--dry-run")
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and message in r.stderr
    assert r.stderr.startswith("tpu_pod.sh: error: ")


# --- SLURM --------------------------------------------------------------------------------------


def sbatch_body(out: str) -> list[str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("+ cat > "))
    delimiter = lines[start].rsplit("<<", 1)[1].strip("'")  # EOF, unless the script has that line
    end = lines.index(delimiter, start + 1)
    return lines[start + 1 : end]


def test_slurm_dry_run_per_gpu(tmp_path, configs_here):
    r = sh(
        SLURM,
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--partition",
        "gpu",
        "--account",
        "acct",
        "--time",
        "12:00:00",
        "--job-name",
        "b16",
        "--config",
        "configs/clip_vit_b16.py:tiny",
        "--workdir",
        "/shared/runs/b16",
        "--env",
        f"MY_B={TRICKY}",
        "--sbatch-arg",
        "--qos=high",
        "--dry-run",
        "--",
        "--config.steps=9",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    commands = plus_lines(r.stdout)
    assert commands == [
        "mkdir -p runs/slurm",
        "cat > runs/slurm/b16.sbatch <<'EOF'",
        "sbatch runs/slurm/b16.sbatch",
    ]
    body = sbatch_body(r.stdout)
    assert body[0] == "#!/bin/bash"
    for line in [
        "#SBATCH --job-name=b16",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gres=gpu:4",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=acct",
        "#SBATCH --time=12:00:00",
        f"#SBATCH --chdir={tmp_path.resolve()}",
        f"#SBATCH --output={tmp_path.resolve()}/runs/slurm/%x-%j.out",
        "#SBATCH --qos=high",
        "  export CLIPJAX_NUM_PROCESSES=$SLURM_NTASKS",
        "  export CLIPJAX_PROCESS_ID=$SLURM_PROCID",
        "  export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID",
        '  exec python -m clipjax.train "$@"',
    ]:
        assert line in body, line
    text = "\n".join(body)
    assert (
        'export CLIPJAX_COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)'
        ':$((29500 + SLURM_JOB_ID % 10000))"'
    ) in text
    assert "srun --kill-on-bad-exit=1" in text
    trainer_line = next(line for line in body if line.startswith("' clipjax-task"))
    assert trainer_line == (
        "' clipjax-task --config configs/clip_vit_b16.py:tiny --workdir /shared/runs/b16 --config.steps=9"
        " || status=$?"
    )
    assert body[-1] == 'exit "$status"'
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    # The script is valid bash.
    script = tmp_path / "job.sbatch"
    script.write_text(text + "\n")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_slurm_dry_run_per_node_and_port(tmp_path, configs_here):
    r = sh(
        SLURM,
        "--nodes",
        "3",
        "--mode",
        "per-node",
        "--port",
        "12345",
        "--script",
        "jobs/x.sbatch",
        "--dry-run",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert plus_lines(r.stdout) == ["mkdir -p jobs", "cat > jobs/x.sbatch <<'EOF'", "sbatch jobs/x.sbatch"]
    body = sbatch_body(r.stdout)
    assert "#SBATCH --ntasks-per-node=1" in body and "#SBATCH --gres=gpu:8" in body
    assert not any("CUDA_VISIBLE_DEVICES" in line for line in body)
    assert not any(line.startswith(("#SBATCH --partition", "#SBATCH --time")) for line in body)
    assert f"#SBATCH --output={tmp_path.resolve()}/jobs/%x-%j.out" in body
    assert any(line.endswith(':12345"') and "CLIPJAX_COORDINATOR" in line for line in body)
    assert "' clipjax-task --config configs/clip_vit_b16.py --workdir runs/clipjax || status=$?" in body


FAKE_SBATCH = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stand-in for sbatch: runs the job at once on "nodes" node-a, node-b, ...
    set -euo pipefail
    nodes=$(sed -n 's/^#SBATCH --nodes=//p' "$1")
    per_node=$(sed -n 's/^#SBATCH --ntasks-per-node=//p' "$1")
    cd "$(sed -n 's/^#SBATCH --chdir=//p' "$1")"
    export SLURM_JOB_ID=4321 SLURM_JOB_NODELIST=fake SLURM_JOB_NUM_NODES=$nodes
    export SLURM_NTASKS=$((nodes * per_node)) SLURM_NTASKS_PER_NODE=$per_node
    echo "Submitted batch job $SLURM_JOB_ID"
    bash "$1" > "$FAKE_JOB_OUT" 2>&1 || true  # the job's status is not sbatch's
    """)
FAKE_SCONTROL = textwrap.dedent("""\
    #!/usr/bin/env bash
    if [[ $1 == requeue ]]; then echo "$2" >> "$FAKE_REQUEUED"; exit 0; fi
    [[ "$1 $2 $3" == "show hostnames fake" ]] || exit 1
    for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do echo "node-$i"; done
    """)
FAKE_SRUN = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stand-in for srun: every task of the job, with its SLURM rank variables.
    while [[ $1 == --* ]]; do shift; done
    pids=()
    for ((t = 0; t < SLURM_NTASKS; t++)); do
      SLURM_PROCID=$t SLURM_LOCALID=$((t % SLURM_NTASKS_PER_NODE)) "$@" &
      pids+=($!)
    done
    status=0
    for p in "${pids[@]}"; do wait "$p" || { s=$?; ((status)) || status=$s; }; done
    exit "$status"
    """)


@pytest.fixture
def fake_slurm(tmp_path, stub):
    """Environment with stand-ins for sbatch, scontrol and srun (the job runs at once, its output
    in tmp_path/job.out) and for the trainer."""
    env, records = stub
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    make_executable(bin_dir / "sbatch", FAKE_SBATCH)
    make_executable(bin_dir / "scontrol", FAKE_SCONTROL)
    make_executable(bin_dir / "srun", FAKE_SRUN)
    env = {
        **env,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_JOB_OUT": str(tmp_path / "job.out"),
        "FAKE_REQUEUED": str(tmp_path / "requeued"),
    }
    return env, records


@pytest.mark.parametrize("status, requeued", [(75, True), (2, False), (0, False)])
def test_slurm_job_that_stopped_early_is_requeued_to_resume(
    tmp_path, configs_here, fake_slurm, status, requeued
):
    """Exit status 75 (stopped early at the time limit or a preemption, step saved) requeues
    the job, which resumes; 0 (done) and 2 (a mistake) do not."""
    env, records = fake_slurm
    env = {**env, "STUB_EXIT_0": str(status), "STUB_EXIT_1": str(status)}
    r = sh(SLURM, "--nodes", "1", "--gpus-per-node", "2", "--workdir", "w", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    script = (tmp_path / "runs" / "slurm" / "clipjax.sbatch").read_text()
    assert "#SBATCH --requeue" in script.splitlines()
    job = (tmp_path / "job.out").read_text()
    assert len(records()) == 2, job
    assert (tmp_path / "requeued").exists() == requeued, job
    if requeued:
        assert (tmp_path / "requeued").read_text() == "4321\n"
        assert "requeueing job 4321 to resume" in job


@pytest.mark.parametrize("mode", ["per-gpu", "per-node"])
def test_slurm_real_submission_with_stand_in_slurm(tmp_path, configs_here, fake_slurm, mode):
    env, records = fake_slurm
    r = sh(
        SLURM,
        "--nodes",
        "2",
        "--gpus-per-node",
        "2",
        "--mode",
        mode,
        "--workdir",
        "w d",
        "--env",
        f"MY_B={TRICKY}",
        "--setup",
        "export MY_SETUP=done",
        "--",
        "--config.steps=2",
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Submitted batch job 4321" in r.stdout
    assert (tmp_path / "runs" / "slurm" / "clipjax.sbatch").is_file()
    runs = records()
    per_node = 2 if mode == "per-gpu" else 1
    assert len(runs) == 2 * per_node, (tmp_path / "job.out").read_text()
    assert sorted(int(x["env"]["CLIPJAX_PROCESS_ID"]) for x in runs) == list(range(2 * per_node))
    for x in runs:
        assert x["env"]["CLIPJAX_COORDINATOR"] == f"node-0:{29500 + 4321}"
        assert x["env"]["CLIPJAX_NUM_PROCESSES"] == str(2 * per_node)
        assert x["env"]["MY_B"] == TRICKY
        assert x["argv"] == ["--config", "configs/clip_vit_b16.py", "--workdir", "w d", "--config.steps=2"]
        assert x["cwd"] == str(tmp_path.resolve())
        if mode == "per-gpu":
            assert x["env"]["CUDA_VISIBLE_DEVICES"] == str(int(x["env"]["CLIPJAX_PROCESS_ID"]) % 2)
        else:
            assert "CUDA_VISIBLE_DEVICES" not in x["env"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "per-core"], "--mode must be per-gpu or per-node"),
        (["--nodes", "0"], "--nodes expects a positive integer"),
        (["--gpus-per-node", "x"], "--gpus-per-node expects a positive integer"),
        (["--port", "70000"], "--port expects a port number"),
        (["--time", "soon"], "--time expects"),
        (["--frobnicate"], "unknown option: --frobnicate"),
        (["--partition"], "--partition needs a value"),
    ],
)
def test_slurm_bad_arguments(tmp_path, args, message):
    r = sh(SLURM, *args, "--dry-run", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and message in r.stderr
    assert r.stderr.startswith("gpu_slurm.sh: error: ")


# --- local multi-process ------------------------------------------------------------------------


def test_local_dry_run(tmp_path, configs_here):
    r = sh(
        LOCAL,
        "3",
        "--devices-per-process",
        "4",
        "--port",
        "23456",
        "--config",
        "configs/demo.py:tiny",
        "--workdir",
        "runs/mp",
        "--env",
        "MY_A=x y",
        "--dry-run",
        "--",
        "--config.steps=5",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    lines = plus_lines(r.stdout)
    assert lines[0] == "mkdir -p runs/mp/logs" and lines[-1] == "wait"
    processes = lines[1:-1]
    assert len(processes) == 3
    for i, line in enumerate(processes):
        assert line.startswith(
            "env CLIPJAX_COORDINATOR=127.0.0.1:23456 CLIPJAX_NUM_PROCESSES=3 "
            f"CLIPJAX_PROCESS_ID={i} CLIPJAX_LOCAL_DEVICES=4 JAX_PLATFORMS=cpu MY_A='x y' "
        )
        assert line.endswith(
            f"-m clipjax.train --config configs/demo.py:tiny --workdir runs/mp "
            f"--config.steps=5 > runs/mp/logs/process_{i}.log 2>&1 &"
        )
    assert not (tmp_path / "runs").exists()


def test_local_dry_run_picks_one_free_port(tmp_path, configs_here):
    r = sh(LOCAL, "2", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    coordinators = {
        w for line in plus_lines(r.stdout) for w in line.split() if w.startswith("CLIPJAX_COORDINATOR=")
    }
    assert len(coordinators) == 1
    port = int(coordinators.pop().rsplit(":", 1)[1])
    assert 0 < port < 65536
    assert "--config configs/demo.py --workdir runs/local >" in r.stdout


def test_local_runs_processes_and_logs_each(tmp_path, configs_here, stub):
    env, records = stub
    r = sh(
        LOCAL,
        "2",
        "--devices-per-process",
        "2",
        "--workdir",
        "wd",
        "--env",
        f"MY_B={TRICKY}",
        "--",
        "--config.steps=1",
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 2 processes finished" in r.stdout
    for i in range(2):
        assert f"stub trainer {i} started" in (tmp_path / "wd" / "logs" / f"process_{i}.log").read_text()
    runs = records()
    assert sorted(x["env"]["CLIPJAX_PROCESS_ID"] for x in runs) == ["0", "1"]
    assert len({x["env"]["CLIPJAX_COORDINATOR"] for x in runs}) == 1
    for x in runs:
        assert x["env"]["CLIPJAX_COORDINATOR"].startswith("127.0.0.1:")
        assert x["env"]["CLIPJAX_NUM_PROCESSES"] == "2" and x["env"]["CLIPJAX_LOCAL_DEVICES"] == "2"
        assert x["env"]["JAX_PLATFORMS"] == "cpu" and x["env"]["MY_B"] == TRICKY
        assert x["argv"] == ["--config", "configs/demo.py", "--workdir", "wd", "--config.steps=1"]


def test_local_failure_stops_the_others_and_propagates_the_status(tmp_path, configs_here, stub):
    env, records = stub
    # Process 1 fails at once; process 0 would run for a minute (as a peer blocked in a
    # collective would, for ever).
    env = {**env, "STUB_EXIT_1": "3", "STUB_SLEEP_0": "60"}
    start = time.monotonic()
    r = sh(LOCAL, "2", "--workdir", "wd", cwd=tmp_path, env=env)
    assert time.monotonic() - start < 30
    assert r.returncode == 3, r.stdout + r.stderr
    assert "process 1 exited with status 3" in r.stderr
    for i in range(2):
        assert (tmp_path / "wd" / "logs" / f"process_{i}.log").is_file()
    runs = records()
    assert len(runs) == 2
    assert all(gone(x["pid"]) for x in runs)


def test_local_run_that_stopped_early_is_started_again_to_resume(tmp_path, configs_here, stub):
    """Both processes exit 75 (stopped early, step saved): all are started again, on a new
    coordinator port, and the launcher ends with the second run's status."""
    env, records = stub
    env = {**env, "STUB_EXITS_0": "75,0", "STUB_EXITS_1": "75,0"}
    r = sh(LOCAL, "2", "--workdir", "wd", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = records()
    assert sorted(x["env"]["CLIPJAX_PROCESS_ID"] for x in runs) == ["0", "0", "1", "1"]
    assert len({x["env"]["CLIPJAX_COORDINATOR"] for x in runs}) == 2
    assert r.stderr.count("starting the processes again to resume") == 1
    assert "all 2 processes finished" in r.stdout
    # A mistake (2) after the resume ends it, with that status.
    for record in (tmp_path / "stub_out").iterdir():
        record.unlink()
    env = {**env, "STUB_EXITS_0": "75,2", "STUB_EXITS_1": "75,0"}
    r = sh(LOCAL, "2", "--workdir", "wd", cwd=tmp_path, env=env)
    # (process 1's second run may be stopped before it records itself)
    assert r.returncode == 2, r.stdout + r.stderr
    assert [x["env"]["CLIPJAX_PROCESS_ID"] for x in records()].count("0") == 2


def test_local_interrupt_stops_every_process(tmp_path, configs_here, stub):
    env, records = stub
    env = {**env, "STUB_SLEEP_0": "60", "STUB_SLEEP_1": "60"}
    proc = subprocess.Popen(
        ["bash", str(LOCAL), "2", "--workdir", "wd"],
        cwd=tmp_path,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while len(records()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(records()) == 2
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, out + err
    assert "SIGTERM received" in err
    assert all(gone(x["pid"]) for x in records())


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the number of processes N is required"),
        (["0"], "N must be a positive integer"),
        (["two"], "N must be a positive integer"),
        (["2", "3"], "unexpected argument: 3"),
        (["2", "--devices-per-process", "0"], "--devices-per-process expects a positive integer"),
        (["2", "--port", "port"], "--port expects a port number"),
        (["2", "--workdir", "gs://b/w"], "--workdir must be a local directory"),
        (["2", "--nope"], "unknown option: --nope"),
    ],
)
def test_local_bad_arguments(tmp_path, args, message):
    r = sh(LOCAL, *args, "--dry-run", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and message in r.stderr
    assert r.stderr.startswith("local_multiprocess.sh: error: ")


# --- values written into generated scripts; checks before anything is launched ------------------


def sbatch_words(line: str) -> list[str]:
    """The arguments sbatch takes from one '#SBATCH' line, split as sbatch does (src/sbatch/opt.c,
    _get_argument): whitespace separates them, ' and " quote, a backslash escapes the next character
    anywhere, and an unquoted # ends the line."""
    assert line.startswith("#SBATCH ")
    s, i, words = line.removeprefix("#SBATCH"), 0, []
    while True:
        while i < len(s) and s[i].isspace():
            i += 1
        if i == len(s):
            return words
        word: list[str] = []
        quote, escape = "", False
        while i < len(s) and (quote or not s[i].isspace()):
            c = s[i]
            i += 1
            if escape:
                escape = False
            elif c == "\\":
                escape = True
                continue
            elif quote:
                if c == quote:
                    quote = ""
                    continue
            elif c in "'\"":
                quote = c
                continue
            elif c == "#":
                return words + (["".join(word)] if word else [])
            word.append(c)
        assert not quote, f"sbatch would stop at an unmatched {quote} in {line!r}"
        words.append("".join(word))


def run_printed_dry_run(out: str, cwd, env) -> subprocess.CompletedProcess:
    """Run a dry run's output as the shell script it claims to be: its "+ " lines are the commands,
    the other lines the here-documents they read."""
    script = "\n".join(line[2:] if line.startswith("+ ") else line for line in out.splitlines())
    return subprocess.run(
        ["bash", "-c", script], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "option", ["--partition", "--account", "--time", "--job-name", "--sbatch-arg", "--script"]
)
def test_slurm_rejects_a_newline_in_a_value_of_the_job_script(tmp_path, configs_here, fake_slurm, option):
    """An #SBATCH line cannot hold a newline: such a value is refused with one line naming the
    option, before anything is written or submitted (no line of it reaches the job script)."""
    env, records = fake_slurm
    marker = tmp_path / "injected"
    value = {
        "--sbatch-arg": f"--qos=high\ntouch {marker}",
        "--script": f"jobs\ntouch {marker}\n/job.sbatch",
    }.get(option, f"gpu\ntouch {marker}")
    for extra in ([], ["--dry-run"]):
        r = sh(SLURM, option, value, *extra, cwd=tmp_path, env=env)
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr == f"gpu_slurm.sh: error: {option} must not contain a newline\n"
        assert r.stdout == ""
        assert not marker.exists() and records() == []
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["bin", "configs", "stub_out", "stub_trainer.py"]
        )


EVIL = "a;b c $(touch {m}) `touch {m}`; touch {m} & 'q' \"dq\" \\back # not a comment"


def test_slurm_values_with_shell_characters_reach_sbatch_and_the_trainer_literally(
    tmp_path, configs_here, fake_slurm
):
    """Values with ; $( ) ` & quotes, backslashes and # are written quoted: sbatch reads each #SBATCH
    value as one argument, the job runs none of them, and the trainer gets them byte for byte."""
    env, records = fake_slurm
    marker = tmp_path / "injected"
    evil = EVIL.format(m=marker)
    multi_line = f"line 1\nEOF\ntouch {marker}\nline 4"
    r = sh(
        SLURM,
        "--nodes",
        "1",
        "--gpus-per-node",
        "1",
        "--partition",
        f"gpu,{evil}",
        "--account",
        evil,
        "--sbatch-arg",
        f"--comment={evil}",
        "--workdir",
        f"w {evil}",
        "--env",
        f"MY_B={evil}",
        "--",
        f"--config.name={evil}",
        f"--config.note={multi_line}",
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert not marker.exists()
    body = (tmp_path / "runs" / "slurm" / "clipjax.sbatch").read_text().splitlines()
    options = [sbatch_words(line) for line in body if line.startswith("#SBATCH")]
    assert [f"--partition=gpu,{evil}"] in options
    assert [f"--account={evil}"] in options
    assert [f"--comment={evil}"] in options
    assert all(len(words) == 1 for words in options), options
    [record] = records()
    assert record["argv"] == [
        "--config",
        "configs/clip_vit_b16.py",
        "--workdir",
        f"w {evil}",
        f"--config.name={evil}",
        f"--config.note={multi_line}",
    ]
    assert record["env"]["MY_B"] == evil
    assert not marker.exists()

    # The dry run prints the same script, and its output runs as shell: the here-document ends
    # where the script does, not at a line of a value (nor at an EOF line of --setup).
    dry = sh(
        SLURM,
        "--gpus-per-node",
        "1",
        "--partition",
        evil,
        "--setup",
        "export MY_SETUP='x\nEOF\ny'",
        "--script",
        "dry/job.sbatch",
        "--dry-run",
        "--",
        f"--config.note={multi_line}",
        cwd=tmp_path,
        env=env,
    )
    assert dry.returncode == 0, dry.stderr
    done = run_printed_dry_run(dry.stdout, tmp_path, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not marker.exists()
    assert "\nEOF\n" in dry.stdout and "<<'EOF'" not in dry.stdout
    assert (tmp_path / "dry" / "job.sbatch").read_text().splitlines() == sbatch_body(dry.stdout)
    [from_dry_run] = [x for x in records() if "MY_SETUP" in x["env"]]
    assert from_dry_run["env"]["MY_SETUP"] == "x\nEOF\ny"
    assert from_dry_run["argv"][-1] == f"--config.note={multi_line}"


MISSING_CONFIG = {
    TPU: ["--tpu", "t", "--zone", "z", "--workdir", "gs://b/w"],
    SLURM: [],
    LOCAL: ["2"],
}


@pytest.mark.parametrize("script", list(MISSING_CONFIG), ids=lambda p: p.name)
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
def test_missing_config_file_is_refused_before_launching(tmp_path, fake_tpu, script, dry_run):
    """--config FILE[:ARG] whose FILE does not exist: one line naming the file, nothing run."""
    env, records, home, fake_python = fake_tpu
    bin_dir = tmp_path / "bin"
    make_executable(bin_dir / "sbatch", FAKE_SBATCH)
    make_executable(bin_dir / "srun", FAKE_SRUN)
    make_executable(bin_dir / "scontrol", FAKE_SCONTROL)
    env = {**env, "FAKE_JOB_OUT": str(tmp_path / "job.out")}
    args = [*MISSING_CONFIG[script], "--config", "configs/nope.py:tiny"]
    if dry_run:
        args.append("--dry-run")
    r = sh(script, *args, cwd=tmp_path, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == ""
    assert r.stderr == f"{script.name}: error: --config file not found: configs/nope.py\n"
    assert records() == [] and not (tmp_path / "gcloud.log").exists() and not (tmp_path / "runs").exists()


def tpu_dry_run(*args):
    return sh(TPU, "--tpu", "t", "--zone", "z", "--skip-setup", "--dry-run", *args)


@pytest.mark.parametrize(
    "args, warned",
    [
        (["--workdir", "gs://b/w"], False),
        (["--workdir", "s3://b/w"], False),
        (["--workdir", "/home/me/run"], True),  # the TPU VM may have several workers
        (["--workdir", "runs/x"], True),
    ],
)
def test_tpu_warns_when_the_workers_may_not_share_the_workdir(args, warned):
    r = tpu_dry_run(*args)
    assert r.returncode == 0, r.stderr
    if warned:
        [line] = r.stderr.splitlines()
        assert line.startswith("tpu_pod.sh: WARNING: --workdir ") and args[1] in line
        assert "gs://" in line
    else:
        assert r.stderr == ""


@pytest.mark.parametrize(
    "accelerator, warned", [("v4-8", False), ("v5litepod-8", False), ("v4-32", True), ("v5litepod-16", True)]
)
def test_tpu_workdir_warning_follows_the_number_of_hosts_created(accelerator, warned):
    r = sh(
        TPU,
        "--tpu",
        "t",
        "--zone",
        "z",
        "--create",
        "--accelerator",
        accelerator,
        "--workdir",
        "/w",
        "--dry-run",
    )
    assert r.returncode == 0, r.stderr
    assert ("WARNING: --workdir /w" in r.stderr) == warned, r.stderr
    assert len(r.stderr.splitlines()) == int(warned)


def fs_type(path: str) -> str:
    """The file system type of `path` as `stat -f` names it ("" when that cannot be told)."""
    try:
        done = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True)
    except OSError:
        return ""
    return done.stdout.strip()


@pytest.mark.skipif(
    fs_type("/dev/shm") != "tmpfs", reason="needs /dev/shm on tmpfs, a file system that is surely node-local"
)
@pytest.mark.parametrize(
    "nodes, workdir, warned",
    [
        ("2", "/dev/shm/clipjax-test/run", True),
        ("1", "/dev/shm/clipjax-test/run", False),
        ("2", "gs://b/w", False),
    ],
)
def test_slurm_warns_about_a_node_local_workdir_on_several_nodes(
    tmp_path, configs_here, nodes, workdir, warned
):
    r = sh(SLURM, "--nodes", nodes, "--workdir", workdir, "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    if warned:
        [line] = r.stderr.splitlines()
        assert line.startswith(f"gpu_slurm.sh: WARNING: --workdir {workdir} ") and "tmpfs" in line
    else:
        assert r.stderr == ""


def test_the_pod_install_line_brings_the_bucket_client_and_the_tested_jax():
    """Every pod worker installs what the script's own line names: the gs:// workdir it requires
    needs gcsfs there (its absence stopped every worker with 'Please install gcsfs'), and the TPU
    jax must be the one the project is tested with."""
    import re
    import tomllib

    import jax

    extras = re.search(r'pip install -e \\"\.\[([a-z,_-]+)\]\\"', TPU.read_text())
    assert extras, "launch/tpu_pod.sh installs the project with no extras"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    installed = list(project["dependencies"])
    for extra in extras.group(1).split(","):
        installed += project["optional-dependencies"][extra]
    names = {re.split(r"[<>=\[ ]", r, maxsplit=1)[0].lower() for r in installed}
    assert "gcsfs" in names, installed
    assert f"jax[tpu]=={jax.__version__}" in installed, installed
