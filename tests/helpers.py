"""Small helpers shared by the tests."""

import contextlib
import importlib.util
import json
import os
import pathlib
import resource
import shutil

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_module(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(name, arg="tiny"):
    """`configs/NAME`'s get_config(arg), as `--config configs/NAME:arg` gives it."""
    return _load_module(ROOT / "configs" / name).get_config(arg)


def load_benchmark(name):
    """The script `benchmarks/NAME.py` as a module (they are scripts, not a package)."""
    return _load_module(ROOT / "benchmarks" / f"{name}.py")


def tiny_demo(data_dir, **overrides):
    """configs/demo.py:tiny reading its data from `data_dir`, with dotted-key overrides."""
    from clipjax.config import apply_overrides

    c = load_config("demo.py")
    c.data.data_dir = data_dir
    return apply_overrides(c, overrides)


def checkpoint_state(workdir, step=None):
    """(step, the state {params, opt_state, ...} saved at `step`, the newest by default)."""
    from clipjax.checkpoint import Checkpointer

    checkpointer = Checkpointer(str(workdir))
    step = checkpointer.latest_step() if step is None else step
    state = checkpointer.manager.restore(step)["state"]
    checkpointer.close()
    return step, state


def checkpoint_params(workdir, step=None):
    """The parameters saved at `step` (the newest by default), as a list of numpy arrays."""
    return [np.asarray(x) for x in jax.tree.leaves(checkpoint_state(workdir, step)[1]["params"])]


def copy_run(workdir, dest):
    """A copy of a trained workdir at `dest`, for a test that changes it (a shared run stays as trained)."""
    shutil.copytree(workdir, dest, symlinks=True)
    return pathlib.Path(dest)


def paired_unit_embeddings(seed, n, d):
    """[n, d] image and text embeddings, unit norm, correlated pair by pair so the loss is informative."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    img = jax.random.normal(k1, (n, d))
    txt = img + 0.7 * jax.random.normal(k2, (n, d))
    norm = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)
    return norm(img), norm(txt)


def rel_err(a, b):
    """Largest absolute difference relative to the largest magnitude of the reference b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def gradient_floor(grads, share=1e-4):
    """A share of the largest gradient entry: where one entry's error is measured from."""
    import jax

    return share * max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))


def assert_gradients_equal(grads, reference, rtol=1e-5, leaf_rtol=None):
    """Every leaf of `grads` within rtol x (its reference's largest entry, or the floor) of it;
    `leaf_rtol` {path as `jax.tree_util.keystr` gives it: rtol} sets a leaf's own tolerance."""
    import jax

    floor = gradient_floor(reference)
    flat_reference = jax.tree_util.tree_flatten_with_path(reference)[0]
    flat = jax.tree.leaves(grads)
    assert len(flat) == len(flat_reference)
    for (path, g1), g in zip(flat_reference, flat):
        name = jax.tree_util.keystr(path)
        tol = (leaf_rtol or {}).get(name, rtol)
        err = np.max(np.abs(np.asarray(g, np.float64) - np.asarray(g1, np.float64)))
        assert err <= tol * max(float(np.max(np.abs(g1))), floor), name


def decoder_loss_and_gradients(config, devices, batch, vocab_size, step=0):
    """(loss, its parts, gradients on the host) of a model with a captioning decoder at its initial
    parameters on `devices`, its output layer randomised: it starts at zero, and a random one
    gives every decoder weight a gradient."""
    import jax

    from clipjax.parallel import host_batch_to_global, make_mesh
    from clipjax.trainer.state import init_train_state
    from clipjax.trainer.step import make_grad_fn

    mesh = make_mesh(config.mesh, devices=devices)
    setup = init_train_state(config, mesh, vocab_size=vocab_size)
    params = setup.state["params"]
    head = params["decoder"]["head"]["kernel"]
    params["decoder"]["head"]["kernel"] = jax.device_put(
        jax.random.normal(jax.random.key(1), head.shape) * 0.3, head.sharding
    )
    (loss, (_, _, _, parts)), grads = jax.jit(make_grad_fn(config, setup.graphdef, mesh))(
        params, host_batch_to_global(batch, mesh), None, step
    )
    return loss, parts, jax.device_get(grads)


def data_config(**overrides):
    """A complete `config.data` section (the schema's defaults) with dotted-key overrides.

    Decoding stays in the test's process unless `worker_count` is given: starting worker
    processes (the default, one per core) costs seconds per iterator on a test machine.
    """
    from clipjax.config import apply_overrides, default_config

    config = default_config()
    apply_overrides(config, {f"data.{k}": v for k, v in {"worker_count": 0, **overrides}.items()})
    return config.data


def source_and_tokenizer(data):
    """The prepared data source of a `config.data` section and its tokenizer."""
    from clipjax.data.sources import make_source

    source = make_source(data)
    source.prepare()
    return source, source.tokenizer()


def _proc_stat(pid):
    """(state, parent pid, start time) of a process from /proc/PID/stat, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "(command)", which may hold spaces
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def descendants(pid):
    """{pid: start time} of every living process descended from `pid` (Linux: read from /proc)."""
    import os

    stats = {int(p): _proc_stat(p) for p in os.listdir("/proc") if p.isdigit()}
    children = {}
    for child, stat in stats.items():
        if stat is not None:
            children.setdefault(stat[1], []).append(child)
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if stats[child][0] != "Z":
                found[child] = stats[child][2]
                todo.append(child)
    return found


def survivors(processes, timeout=20.0):
    """The processes of `descendants(...)` still running after up to `timeout` seconds (a zombie
    has ended; a pid taken by a new process has too)."""
    import time

    deadline = time.time() + timeout
    while True:
        alive = {p: t for p, t in processes.items() if (s := _proc_stat(p)) and s[0] != "Z" and s[2] == t}
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


def kill_all(processes):
    """SIGKILL whatever of `processes` is still running (a test's clean-up)."""
    import os
    import signal

    for pid in survivors(processes, timeout=0):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def with_ctrl_c(command):
    """`[python, "-m", module, *args]` run with Python's Ctrl-C handler, as a terminal starts it:
    started in the background by a shell, as a test run may be, a process inherits SIGINT
    ignored (and a trainer keeps it so)."""
    python, dash_m, module, *args = command
    assert dash_m == "-m", command
    code = (
        "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    return [python, "-c", code, *args]


def env_without_device_count(env=None) -> dict:
    """`env` (default os.environ) without the virtual device count of XLA_FLAGS (the processes
    take theirs from CLIPJAX_LOCAL_DEVICES), keeping the other flags (conftest.py's)."""
    env = dict(os.environ if env is None else env)
    flags = [f for f in env.pop("XLA_FLAGS", "").split() if "device_count" not in f]
    return {**env, "XLA_FLAGS": " ".join(flags)} if flags else env


class CompileLog:
    """A `jax.monitoring` duration listener that appends [test, event, seconds, function] for
    every trace, lowering and XLA compile to `folder`/PID.jsonl (one file per worker process);
    `test` names the test running (tests/conftest.py sets it)."""

    def __init__(self, folder):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"{os.getpid()}.jsonl")
        self.test = "<collection>"

    def __call__(self, event, seconds, **kwargs):
        if event.startswith("/jax/core/compile/"):
            self._append([self.test, event.rsplit("/", 1)[1], round(seconds, 3), kwargs.get("fun_name")])

    def watch_cache_writes(self):
        """Also log every program written to the persistent compilation cache, as [test,
        "cache_write", compile seconds, "module key"]: a key written twice is a program compiled
        twice, by two workers that both missed it. JAX reports no key through `jax.monitoring`, so
        this wraps its private writer (a diagnostic: nothing else depends on it). Returns the
        function that unwraps it."""
        from jax._src import compiler

        write = compiler._cache_write

        def logged_write(cache_key, compile_time_secs, module_name, *args, **kwargs):
            self._append(
                [self.test, "cache_write", round(compile_time_secs, 3), f"{module_name} {cache_key}"]
            )
            return write(cache_key, compile_time_secs, module_name, *args, **kwargs)

        compiler._cache_write = logged_write
        return lambda: setattr(compiler, "_cache_write", write)

    @contextlib.contextmanager
    def cpu_seconds(self):
        """Log the CPU seconds of the block, as [test, "cpu_self" or "cpu_children", seconds,
        None]: this process's, and those of the subprocesses that ended in it (trainers)."""
        start = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        yield
        end = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        for name, before, after in zip(("cpu_self", "cpu_children"), start, end):
            seconds = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            self._append([self.test, name, round(seconds, 3), None])

    def _append(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
