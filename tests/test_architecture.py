"""The layout holds: the library never imports an entry point, no two modules import each other,
and docs/configs.md lists exactly the schema's fields."""

import ast
import pathlib

import pytest

from clipjax import config as config_lib

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
