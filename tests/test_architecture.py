"""The layout holds: the library never imports an entry point, no two modules import each other,
only the run store names the workdir's files, and docs/configs.md lists exactly the schema's fields."""

import ast
import pathlib

import pytest

from clipjax import config as config_lib
from clipjax.run_store import layout

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clipjax"
ENTRY_POINTS = {"clipjax.train", "clipjax.evaluate", "clipjax.plan", "clipjax.data.convert"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """clipjax modules that `path` imports anywhere (top level or inside functions)."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from clipjax.data import pipeline` imports the module clipjax.data.pipeline; names
            # that are not submodules come from `base` itself.
            submodules = {f"{base}.{a.name}" for a in node.names} & set(MODULES)
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_graph_sees_imports_inside_functions():
    # Guards the test itself: a function-level import must count.
    assert "clipjax.trainer" in GRAPH["clipjax.train"]
    assert "clipjax.api" in GRAPH["clipjax.evaluate"]


@pytest.mark.parametrize("name", sorted(set(MODULES) - ENTRY_POINTS))
def test_library_modules_do_not_import_entry_points(name):
    assert not GRAPH[name] & ENTRY_POINTS, f"{name} imports {sorted(GRAPH[name] & ENTRY_POINTS)}"


def test_no_two_modules_import_each_other():
    mutual = sorted(
        {tuple(sorted((a, b))) for a, deps in GRAPH.items() for b in deps if a in GRAPH.get(b, ())}
    )
    assert not mutual, mutual


def test_api_needs_nothing_from_the_trainer():
    # Everything api.py reaches, transitively, stays outside the trainer and the entry points.
    seen, todo = set(), ["clipjax.api"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(GRAPH[module])
    assert not {m for m in seen if m.startswith("clipjax.trainer")} | (seen & ENTRY_POINTS)


def test_run_store_imports_neither_the_trainer_nor_the_api():
    for name in (m for m in MODULES if m.startswith("clipjax.run_store")):
        upward = {m for m in GRAPH[name] if m.startswith(("clipjax.trainer", "clipjax.api", "clipjax.cli"))}
        assert not upward | (GRAPH[name] & ENTRY_POINTS), f"{name} imports {sorted(upward)}"


LAYOUT_NAMES = {v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str)}
# Names the workdir shares with another layout: a Hugging Face model folder has a config.json.
OTHER_LAYOUTS = {("clipjax.pretrained.layouts", layout.CONFIG)}


def _layout_names_spelled_out(path: pathlib.Path) -> set[str]:
    """The workdir's file names a module spells as string literals (`"config.json"`, or a path
    ending in one) rather than taking them from `clipjax.run_store.layout`. Dict keys are config
    fields (the `profile` section), not paths."""
    tree = ast.parse(path.read_text(), str(path))
    keys = {id(k) for node in ast.walk(tree) if isinstance(node, ast.Dict) for k in node.keys}
    return {
        name
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in keys
        for name in LAYOUT_NAMES
        if node.value == name or node.value.endswith("/" + name)
    }


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not m.startswith("clipjax.run_store")))
def test_only_the_run_store_names_the_workdirs_files(name):
    spelled = {n for n in _layout_names_spelled_out(MODULES[name]) if (name, n) not in OTHER_LAYOUTS}
    assert not spelled, f"{name} spells out {sorted(spelled)}: take them from clipjax.run_store.layout"


def test_the_layout_scan_sees_a_spelled_out_name(tmp_path):
    # Guards the test above: a module that joins "metrics.jsonl" itself is caught.
    module = tmp_path / "m.py"
    module.write_text('from clipjax import paths\nP = paths.join(w, "metrics.jsonl")\nQ = f"{w}/LOCK"\n')
    assert _layout_names_spelled_out(module) == {layout.METRICS, layout.LOCK}


# The floors of shared/ARCHITECTURE.md, lowest first: a module imports only from its own floor or
# below. Within a floor, modules are peers (the components use each other's pieces: a pretrained
# layout reads the model spec, the metric writer plots metrics), except where a rule below says not.
FLOORS = [
    # vocabulary any layer may read
    ("schema", "paths", "console", "captions", "prompts", "run_store.layout"),
    ("parallel",),
    # components
    ("models", "losses", "metrics", "data", "optim", "flops", "checkpoint", "workdir_lock")
    + (
        "wandb_writer",
        "metric_writer",
        "pretrained.layouts",
        "pretrained.open_clip_coca",
        "pretrained.preprocessing",
        "pretrained.tensors",
    ),
    ("evals",),
    ("config",),  # the schema assembled from the sections the floors below declare
    ("run_store",),
    ("trainer", "api", "evals.workdir", "pretrained.workdir"),
    ("cli", "planning", "clipjax"),
    ("train", "evaluate", "plan", "convert", "data.convert"),
]


def floor_of(module: str) -> int:
    """The floor of the longest prefix that names `module` (`clipjax` alone is the package's face)."""
    short = module.removeprefix("clipjax.") if module != "clipjax" else "clipjax"
    best, floor = -1, None
    for level, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (short == prefix or short.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), level
    assert floor is not None, f"{module} is on no floor of FLOORS: place it"
    return floor


def upward_imports(graph) -> list[str]:
    return sorted(
        f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
        for a, deps in graph.items()
        for b in deps
        if floor_of(b) > floor_of(a)
    )


def test_no_import_runs_back_up_a_floor():
    assert not upward_imports(GRAPH), "\n".join(upward_imports(GRAPH))


def test_the_floor_check_sees_data_importing_an_evaluator():
    # Guards the test above with the edge it was written for (a source reading evals' prompts).
    graph = dict(GRAPH, **{"clipjax.data.sources.classes": {"clipjax.evals.zero_shot"}})
    assert upward_imports(graph) == [
        "clipjax.data.sources.classes (floor 2) imports clipjax.evals.zero_shot (floor 3)"
    ]


def test_the_trainer_does_not_import_the_api():
    # The face and the wiring are peers over the run store: neither reaches into the other.
    assert not {d for n, deps in GRAPH.items() if n.startswith("clipjax.trainer") for d in deps} & {
        "clipjax.api",
        "clipjax",
    }


def _source_internals(module: str) -> bool:
    """A module inside one source (clipjax.data.sources.<name>...), not the registry package."""
    return module.startswith("clipjax.data.sources.") and module != "clipjax.data.sources.base"


def test_evaluators_read_no_sources_internals_and_the_data_core_no_source():
    for name, deps in GRAPH.items():
        if name.startswith("clipjax.evals"):
            assert not {d for d in deps if _source_internals(d)}, f"{name} reads a source's internals"
        core = name.startswith("clipjax.data.") and not name.startswith(
            ("clipjax.data.sources", "clipjax.data.prepare", "clipjax.data.convert")
        )
        if core:
            assert not {d for d in deps if d.startswith("clipjax.data.sources")}, f"{name} imports a source"


def test_every_package_says_its_job():
    for path in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.split()) >= 5, f"{path.relative_to(ROOT)} has no docstring saying its job"


def test_configs_doc_lists_exactly_the_schema_fields():
    """docs/configs.md holds the table `python -m clipjax.config` prints (regenerate it with
    `python -m clipjax.config --update docs/configs.md`)."""
    doc = (ROOT / "docs" / "configs.md").read_text()
    begin, end = config_lib.DOC_BEGIN, config_lib.DOC_END
    assert begin in doc and end in doc
    table = doc.split(begin, 1)[1].split(end, 1)[0]
    assert table == config_lib.markdown_table()
    # And the table covers every field of the schema, each with a meaning.
    documented = {row.split("`")[1] for row in table.splitlines() if row.startswith("| `")}
    flat = config_lib.flatten(config_lib.default_config())
    assert set(flat) <= documented, sorted(set(flat) - documented)
    for row in table.splitlines()[2:]:
        assert row.rstrip(" |").split("|")[-1].strip(), row
