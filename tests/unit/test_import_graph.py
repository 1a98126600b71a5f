"""The layout's rules, checked on the source (no imports executed): no import circles, no re-export façades, no
private names across modules, no test module imported by another, no benchmark leaning on tests/."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[2]
PACKAGES = ("infra", "app", "policy", "testbed", "tests", "benchmarks")


@dataclass(frozen=True)
class Import:
    importer: str
    module: str  # the module imported from (or imported whole)
    name: str | None  # the name taken from it, None for `import module`
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_DIR).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, ast.Module]:
    return {
        module_name(path): ast.parse(path.read_text(), filename=str(path))
        for package in PACKAGES
        for path in sorted((PROJECT_DIR / package).rglob("*.py"))
    }


def imports_of(importer: str, tree: ast.Module, modules: dict[str, ast.Module]) -> list[Import]:
    """Every import of a project module anywhere in the file (inside functions and TYPE_CHECKING blocks too: a
    circle that only a lazy import hides is still a circle)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(importer, a.name, None, node.lineno) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in modules:  # `from infra.local import images`: the module itself
                    found.append(Import(importer, submodule, None, node.lineno))
                else:
                    found.append(Import(importer, node.module, alias.name, node.lineno))
    return found


def defined_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {n.id for target in node.targets for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, ast.Module], list[Import]]:
    modules = project_modules()
    return modules, [found for name, tree in modules.items() for found in imports_of(name, tree, modules)]


def test_the_graph_sees_the_project(graph) -> None:
    modules, imports = graph
    assert {"infra.spec.stack", "infra.local.stack", "app.main", "tests.conftest", "testbed.stack"} <= set(modules)
    assert any(i.importer == "infra.program.model_stack" and i.module == "infra.spec.stack" for i in imports)


def test_circles_are_found_when_there_are_some() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles(graph) -> None:
    _, imports = graph
    edges: dict[str, set[str]] = {}
    for found in imports:
        if found.module != found.importer:
            edges.setdefault(found.importer, set()).add(found.module)
    assert circles(edges) == []


def test_every_imported_name_is_defined_where_it_is_imported_from(graph) -> None:
    """No re-export façades: a name comes from the module that defines it, so moving it breaks loudly."""
    modules, imports = graph
    borrowed = [
        f"{i.importer}:{i.line} takes {i.name} from {i.module}, which only imports it"
        for i in imports
        if i.name is not None and i.name not in defined_names(modules[i.module])
    ]
    assert borrowed == []


def test_no_private_name_crosses_a_module(graph) -> None:
    _, imports = graph
    private = [f"{i.importer}:{i.line} imports {i.module}.{i.name}" for i in imports if (i.name or "").startswith("_")]
    assert private == []


def test_no_test_module_or_conftest_is_imported(graph) -> None:
    """What tests share lives in tests/support/ (or testbed/ when benchmarks need it too); fixtures in conftest.py."""
    _, imports = graph
    leaning = [
        f"{i.importer}:{i.line} imports {i.module}"
        for i in imports
        if i.module.rpartition(".")[2].startswith("test_") or i.module.rpartition(".")[2] == "conftest"
    ]
    assert leaning == []


def test_benchmarks_and_the_product_do_not_import_tests(graph) -> None:
    _, imports = graph
    outside = [
        f"{i.importer}:{i.line} imports {i.module}"
        for i in imports
        if not i.importer.startswith("tests") and i.module.startswith("tests")
    ]
    product = [
        f"{i.importer}:{i.line} imports {i.module}"
        for i in imports
        if i.importer.startswith(("infra", "app", "policy")) and i.module.startswith(("testbed", "benchmarks"))
    ]
    assert outside == [] and product == []


def test_every_module_that_locates_the_project_finds_its_root(graph) -> None:
    """A module that moved a level deeper and kept `parents[1]` looks for app/ inside infra/ (a fresh CI run died on
    it building images)."""
    import importlib

    modules, _ = graph
    locating = [name for name, tree in modules.items() if "PROJECT_DIR" in defined_names(tree)]
    assert "infra.local.images" in locating
    wrong = {
        name: str(importlib.import_module(name).PROJECT_DIR)
        for name in locating
        if not (importlib.import_module(name).PROJECT_DIR / "Pulumi.yaml").is_file()
    }
    assert wrong == {}
