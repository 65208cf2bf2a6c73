"""Kill the tiny demo at random moments, fill its disk, and check that no run is ever lost.

    python benchmarks/fault_injection.py [--kills 20] [--steps 12] [--out /tmp/clipjax_faults]

1. A reference run of `configs/demo.py:tiny` (--steps steps, a checkpoint every 2) goes
   uninterrupted.
2. --kills times: the same run is started, SIGKILLed after a random delay drawn over the whole
   length of a run (start-up, compilation, steps and the asynchronous saves), every checkpoint
   left behind is restored in full (none may be unreadable), then the run is restarted to the
   end and its final parameters are compared with the reference, bit for bit.
3. A full disk: the workdir is a small tmpfs (when this machine lets us mount one; otherwise
   every write from the third checkpoint on is made to fail inside the trainer). The run must
   stop at the failing save with one line and a non-zero exit; the workdir is then moved to a
   normal disk and the run resumed: again the reference's parameters.

Prints one line per run and a summary; exits 1 if any run was lost or any checkpoint unreadable.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import logging as absl_logging  # noqa: E402

from clipjax.checkpoint import Checkpointer  # noqa: E402

absl_logging.set_verbosity(absl_logging.ERROR)

parser = argparse.ArgumentParser()
parser.add_argument("--kills", type=int, default=20)
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="/tmp/clipjax_faults")
args = parser.parse_args()

ENV = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    # Compiled programs are reused across the many short runs.
    "JAX_COMPILATION_CACHE_DIR": os.path.join(args.out, "jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
}


def command(workdir, *extra):
    return [
        sys.executable, "-m", "clipjax.train", "--config", "configs/demo.py:tiny", "--workdir", workdir,
        f"--config.data.data_dir={os.path.join(args.out, 'tfds')}", f"--config.steps={args.steps}",
        "--config.checkpoint_every=2", "--config.log_every=1", "--config.evals.at_end=False", *extra,
    ]  # fmt: skip


def train(workdir, *extra):
    return subprocess.run(command(workdir, *extra), cwd=ROOT, env=ENV, capture_output=True, text=True)


def params(workdir, step=None):
    ckpt = Checkpointer(workdir)
    try:
        step = ckpt.latest_step() if step is None else step
        return [np.asarray(x) for x in _leaves(ckpt.read_everything(step)["state"]["params"])]
    finally:
        ckpt.close()


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def unreadable_checkpoints(workdir) -> list[str]:
    """Every listed checkpoint restored in full (state, data, meta); the ones that fail."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return []
    ckpt = Checkpointer(workdir)
    bad = []
    try:
        for step in ckpt.all_steps():
            try:
                restored = ckpt.read_everything(step)
                assert {"state", "data", "meta"} <= set(restored), sorted(restored)
            except Exception as e:  # noqa: BLE001
                bad.append(f"{step}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    finally:
        ckpt.close()
    return bad


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def main():
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    ref = train(os.path.join(args.out, "reference"))
    ref_s = time.perf_counter() - t0
    assert ref.returncode == 0, ref.stderr[-3000:]
    t0 = time.perf_counter()
    again = train(os.path.join(args.out, "reference2"))  # compiled programs cached: a typical run
    run_s = time.perf_counter() - t0
    assert again.returncode == 0, again.stderr[-3000:]
    reference = params(os.path.join(args.out, "reference"))
    assert same(reference, params(os.path.join(args.out, "reference2"))), "two straight runs differ"
    print(f"reference: {args.steps} steps, first run {ref_s:.1f} s, cached {run_s:.1f} s", flush=True)

    lost, unreadable, during_save = 0, 0, 0
    for i in range(args.kills):
        workdir = os.path.join(args.out, f"kill{i:02d}")
        delay = float(rng.uniform(0.5, run_s))
        proc = subprocess.Popen(
            command(workdir), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(delay)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt_dir = os.path.join(workdir, "checkpoints")
        tmp = [n for n in os.listdir(ckpt_dir) if "tmp" in n] if os.path.isdir(ckpt_dir) else []
        during_save += bool(tmp)
        steps_left = (
            sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if os.path.isdir(ckpt_dir) else []
        )
        bad = unreadable_checkpoints(workdir)
        resumed = train(workdir)
        bad += unreadable_checkpoints(workdir)
        ok = resumed.returncode == 0 and same(params(workdir), reference)
        lost += not ok
        unreadable += len(bad)
        print(
            f"kill {i:2d} after {delay:5.1f} s{' (already finished)' if finished else ''}: checkpoints {steps_left}"
            f"{', a save in flight' if tmp else ''}; restart {'matches the reference' if ok else 'DIFFERS'}"
            f"{'; unreadable: ' + '; '.join(bad) if bad else ''}",
            flush=True,
        )
        if resumed.returncode != 0:
            print(resumed.stderr[-2000:])

    full_ok = full_disk(reference)
    print(
        f"summary: {args.kills} kills ({during_save} during a save): {args.kills - lost} resumed to the reference "
        f"parameters, {unreadable} unreadable checkpoints; full disk: {'ok' if full_ok else 'FAILED'}"
    )
    sys.exit(0 if lost == 0 and unreadable == 0 and full_ok else 1)


def full_disk(reference) -> bool:
    mount = os.path.join(args.out, "small_disk")
    os.makedirs(mount)
    # Room for the data of about two checkpoints: the third (or its metrics) fills the disk.
    size_kb = int(
        sum(
            os.path.getsize(os.path.join(d, f))
            for d, _, fs in os.walk(os.path.join(args.out, "reference", "checkpoints", str(args.steps)))
            for f in fs
        )
        * 2.5
        / 1024
    )
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", mount], capture_output=True
    )
    try:
        if mounted.returncode == 0:
            how = f"a {size_kb} KiB tmpfs"
            run = train(os.path.join(mount, "run"))
        else:
            how = "an injected ENOSPC from the third checkpoint on"
            run = subprocess.run([sys.executable, "-c", INJECTED, *command(os.path.join(mount, "run"))[3:]],
                                 cwd=ROOT, env=ENV, capture_output=True, text=True)  # fmt: skip
        errors = [line for line in run.stderr.splitlines() if line.startswith("clipjax.")]
        stopped = (
            run.returncode != 0
            and len(errors) == 1
            and "could not be written" in errors[0]
            or (run.returncode != 0 and len(errors) == 1 and "checkpoint write" in errors[0])
        )
        saved = os.path.join(args.out, "full_disk_run")
        shutil.copytree(os.path.join(mount, "run"), saved, ignore=shutil.ignore_patterns("LOCK"))
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", mount], check=False)
    bad = unreadable_checkpoints(saved)
    resumed = train(saved)
    ok = stopped and not bad and resumed.returncode == 0 and same(params(saved), reference)
    print(
        f"full disk ({how}): stopped with {errors[0] if errors else 'NO ERROR LINE'!r} (exit {run.returncode}); "
        f"unreadable checkpoints: {bad or 'none'}; resumed elsewhere: "
        f"{'matches the reference' if ok else 'FAILED'}",
        flush=True,
    )
    return ok


# The trainer's command line with every checkpoint write from step 6 on failing as on a full disk.
INJECTED = """
import runpy, sys
from clipjax import checkpoint
original = checkpoint.Checkpointer.save
def save(self, step, *a, **k):
    if step >= 6:
        raise checkpoint.CheckpointWriteError(f"checkpoint {step} could not be written to {self.directory} "
                                              "(OSError: [Errno 28] No space left on device)")
    return original(self, step, *a, **k)
checkpoint.Checkpointer.save = save
sys.argv = ["clipjax.train", *sys.argv[1:]]
runpy.run_module("clipjax.train", run_name="__main__")
"""


if __name__ == "__main__":
    main()
