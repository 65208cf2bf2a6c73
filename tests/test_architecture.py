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
