"""Where the test suite's compile time goes, from a run with the compile log on.

    rm -rf /tmp/cold && CLIPJAX_TEST_JAX_CACHE=/tmp/cold CLIPJAX_TEST_COMPILE_LOG=/tmp/compiles \\
        python -m pytest -n 2 tests --durations=0
    python benchmarks/test_compile_profile.py /tmp/compiles [--top 25]

The suite is CPU-bound and, from a cold compilation cache, mostly compiling (tests/conftest.py
explains the log). This prints the seconds of tracing, lowering and XLA compiling in all, how the
programs spread by size, how many were compiled more than once (two workers that missed the same
cache key at once) and by which function, then the XLA compile seconds by test file, by test and by
jitted function, each with its number of programs, and the CPU seconds (the worker's and its
subprocesses') by test file and by test. In-process compiles only: a trainer started as a
subprocess is not in the log (`--durations` shows those tests whole). Seconds are wall time in
the worker, so two workers on two busy cores inflate them alike.
"""

import argparse
import collections
import json
import pathlib

COMPILE = "backend_compile_duration"
CACHE_WRITE = "cache_write"  # tests/helpers.py CompileLog.watch_cache_writes
CPU = ("cpu_self", "cpu_children")  # CompileLog.cpu_seconds, per test


def read_log(folder: pathlib.Path) -> list[tuple[str, str, float, str]]:
    """(test id, event, seconds, jitted function) for every record of every worker."""
    records = []
    for path in sorted(folder.glob("*.jsonl")):
        with open(path) as f:
            records += [tuple(json.loads(line)) for line in f if line.strip()]
    return records


def _size(seconds: float) -> str:
    return "over 5 s" if seconds > 5 else "1-5 s" if seconds > 1 else "under 1 s"


def summarise(records, top: int) -> str:
    by_event = collections.Counter()
    groups = ("file", "test", "function", "size")
    seconds = {name: collections.Counter() for name in groups}
    counts = {name: collections.Counter() for name in groups}
    writes = collections.defaultdict(list)  # cache key -> compile seconds of each write
    cpu = {name: collections.Counter() for name in ("file", "test")}
    for test, event, secs, function in records:
        if event == CACHE_WRITE:
            writes[function].append(secs)
            continue
        by_event[event] += secs
        if event in CPU:
            cpu["file"][test.split("::")[0]] += secs
            cpu["test"][test] += secs
            continue
        if event != COMPILE:
            continue
        keys = {"file": test.split("::")[0], "test": test, "function": function or "?", "size": _size(secs)}
        for name, key in keys.items():
            seconds[name][key] += secs
            counts[name][key] += 1
    lines = [f"{event}: {secs:,.0f} s" for event, secs in sorted(by_event.items())]
    lines += [
        f"programs {size}: {counts['size'][size]:,} ({secs:,.0f} s)" for size, secs in seconds["size"].items()
    ]
    if writes:
        repeated = {key: secs for key, secs in writes.items() if len(secs) > 1}
        lines.append(
            f"programs written to the compilation cache: {len(writes):,}; compiled more than once "
            f"(the same key): {len(repeated):,}, {sum(sum(s[1:]) for s in repeated.values()):,.0f} s of repeats"
        )
        names = collections.Counter()
        for key, secs in repeated.items():
            names[key.split(" ")[0]] += sum(secs[1:])
        lines += [f"{secs:8.1f}  {name} (repeats)" for name, secs in names.most_common(top)]
    for name in ("file", "test", "function"):
        lines += ["", f"XLA compile by {name} (seconds, programs):"]
        lines += [
            f"{secs:8.1f} {counts[name][key]:5d}  {key}" for key, secs in seconds[name].most_common(top)
        ]
    for name in ("file", "test"):
        if cpu[name]:
            lines += ["", f"CPU seconds by {name} (the worker's and its subprocesses'):"]
            lines += [f"{secs:8.1f}  {key}" for key, secs in cpu[name].most_common(top)]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=pathlib.Path, help="the CLIPJAX_TEST_COMPILE_LOG folder")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    args = parser.parse_args(argv)
    records = read_log(args.folder)
    if not records:
        parser.error(f"{args.folder}: no compile records (was CLIPJAX_TEST_COMPILE_LOG set to it?)")
    print(summarise(records, args.top))


if __name__ == "__main__":
    main()
