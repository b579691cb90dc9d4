"""The package's import graph, read from the sources with ``ast``: no module imports itself
back through a chain of imports."""

import ast
import importlib.util
from pathlib import Path

import pytest

PACKAGE = "mlx_dsv4"


def _locate(name):
    """(file, is a package) of module ``name``, or None when it is not a module."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin), spec.submodule_search_locations is not None


def _imported_names(tree, module, is_package, *, module_level_only):
    """Names of the modules ``tree`` imports (``from X import y`` counts as X.y and as X)."""
    names = set()

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            counted = not (module_level_only and in_function)
            if isinstance(child, ast.Import) and counted:
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and counted:
                if child.level:
                    parts = module.split(".")[: len(module.split(".")) - child.level + is_package]
                    base = ".".join(parts + ([child.module] if child.module else []))
                else:
                    base = child.module
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child, inside)

    visit(tree, False)
    return names


def declared_packages():
    """The packages pyproject.toml installs (``mlx_dsv4.convert`` lives in its own folder)."""
    tomllib = pytest.importorskip("tomllib")
    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]["packages"]


def import_graph(package, *, module_level_only, roots=()):
    """{module: modules of ``package`` it imports}, for every module reached from ``package``
    and ``roots`` through subpackages and imports of either kind."""
    graph, todo = {}, [package, *roots]
    while todo:
        module = todo.pop()
        if module in graph:
            continue
        path, is_package = _locate(module)
        if is_package:
            for child in path.parent.iterdir():
                if child.suffix == ".py" and child.stem != "__init__":
                    todo.append(f"{module}.{child.stem}")
                elif (child / "__init__.py").is_file():
                    todo.append(f"{module}.{child.name}")
        tree = ast.parse(path.read_text(encoding="utf-8"))

        def targets(names):
            return {n for n in names if (n == package or n.startswith(package + ".")) and n != module and _locate(n)}

        graph[module] = targets(_imported_names(tree, module, is_package, module_level_only=module_level_only))
        todo.extend(targets(_imported_names(tree, module, is_package, module_level_only=False)))
    return graph


def find_cycle(graph):
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_cycle_finder_sees_a_function_level_cycle():
    tree = ast.parse("import os\n\ndef f():\n    from .b import g\n")
    assert _imported_names(tree, "p.a", False, module_level_only=True) == {"os"}
    assert _imported_names(tree, "p.a", False, module_level_only=False) == {"os", "p.b", "p.b.g"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_chat_package_has_no_import_cycle():
    chat = f"{PACKAGE}.chat"
    graph = import_graph(chat, module_level_only=False)
    inside = {m: {t for t in targets if t.startswith(chat + ".")} for m, targets in graph.items()
              if m.startswith(chat + ".")}
    assert {f"{chat}.adapters", f"{chat}.parse", f"{chat}.stream", f"{chat}.wiretext"} <= set(inside)
    assert find_cycle(inside) is None


def test_chat_json_and_reserved_checks_depend_on_definitions_only():
    chat = f"{PACKAGE}.chat"
    graph = import_graph(chat, module_level_only=False)
    assert graph[f"{chat}.wiretext"] == {f"{chat}.errors", f"{chat}.special"}
    assert graph[f"{chat}.errors"] == set() and graph[f"{chat}.special"] == set()


def test_package_has_no_module_level_import_cycle():
    graph = import_graph(PACKAGE, module_level_only=True, roots=declared_packages())
    assert f"{PACKAGE}.convert" in graph and f"{PACKAGE}.server.app" in graph
    assert find_cycle(graph) is None


LEAVES = {f"{PACKAGE}.{m}" for m in ("config", "spec", "memory", "sizes", "sampling", "sharding")}


def test_leaf_modules_import_only_leaves():
    graph = import_graph(PACKAGE, module_level_only=False, roots=declared_packages())
    for leaf in LEAVES:
        assert graph[leaf] <= LEAVES, (leaf, graph[leaf] - LEAVES)
    assert graph[f"{PACKAGE}.config"] == set() and graph[f"{PACKAGE}.sizes"] == set()


def test_converter_depends_only_on_leaf_modules():
    """Estimating and converting never build the model: the converter reads the checkpoint contract,
    the config parser and the size helpers, nothing else of the package but the writer of mlx-lm's
    files (model file and chat template: text, built from the chat package's protocol strings)."""
    convert = f"{PACKAGE}.convert"
    graph = import_graph(PACKAGE, module_level_only=False, roots=declared_packages())
    for module, targets in graph.items():
        if module == convert or module.startswith(convert + "."):
            outside = {t for t in targets if not (t == convert or t.startswith(convert + "."))}
            assert outside <= LEAVES | {PACKAGE, f"{PACKAGE}.mlx_lm_files"}, (module, outside - LEAVES)
    assert graph[f"{PACKAGE}.mlx_lm_files"] <= {f"{PACKAGE}.chat", f"{PACKAGE}.chat.special"}
