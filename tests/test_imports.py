"""No module of the two packages is part of an import cycle.

A cycle held together by a function-local import, or by an import under `if TYPE_CHECKING:`,
still means two modules that cannot be read, tested or changed apart (a type a module names is
part of what it depends on), so the graph counts every `import` and `from … import` wherever
it stands. The walk reads the source (AST), so it needs none of the optional extras installed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("instance_agent", "lambda_trigger")
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def modules() -> dict[str, Path]:
    """Every module of both packages, by dotted name (a package is its __init__)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements at any depth: in functions, classes and `if TYPE_CHECKING:` too."""
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of the first such import}."""
    known = modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from pkg import mod` imports the module mod; `from mod import name` the module.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for target in targets:
                # `import a.b.c` of a non-module name resolves to its longest module prefix.
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[target] = min(edges.get(target, node.lineno), node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    """Each import inside the cycle, as `a.py:LINE imports b`."""
    members = set(component)
    lines = [
        f"  {a}:{line} imports {b}" for a in component for b, line in sorted(graph[a].items()) if b in members
    ]
    return "cycle among " + ", ".join(component) + ":\n" + "\n".join(lines)


def test_the_walk_counts_function_local_and_type_checking_imports() -> None:
    source = """
import a
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    import only_for_types
else:
    import fallback
def f():
    from b import c
    class K:
        def g(self):
            import d.e
"""
    found = sorted(
        alias.name if isinstance(node, ast.Import) else str(node.module)
        for node in _imports(ast.parse(source))
        for alias in node.names
    )
    assert found == ["a", "b", "d.e", "fallback", "only_for_types", "typing"]
    graph = import_graph()
    # In the real graph: ops_cli imports doctor only inside cmd_doctor, and s3args names
    # Config only for the type checker.
    assert "instance_agent.doctor" in graph["instance_agent.ops_cli"]
    assert "instance_agent.config" in graph["instance_agent.s3args"]


def test_no_module_is_part_of_an_import_cycle() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(describe(c, graph) for c in found)


def private_imports(tree: ast.AST) -> list[str]:
    """Every project name with a leading-underscore part that `tree` imports, at any depth and
    under TYPE_CHECKING too (`from m import _name`, `import pkg._mod`, `from . import _mod`)."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] not in PACKAGES:
                continue
            base = "." * node.level + (node.module or "")
            names = [f"{base}.{a.name}" if node.module else base + a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]
        else:
            continue
        found += [n for n in names if any(_private(part) for part in n.split("."))]
    return found


def private_attributes(tree: ast.AST, known: set[str]) -> list[str]:
    """Every `mod._name` where `mod` is a project module the tree imports (`from pkg import
    mod`, `import pkg.mod as mod`): a private name reached through the module object."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            bound.update(
                {
                    a.asname or a.name: f"{node.module}.{a.name}"
                    for a in node.names
                    if f"{node.module}.{a.name}" in known
                }
            )
        elif isinstance(node, ast.Import):
            bound.update({a.asname: a.name for a in node.names if a.asname and a.name in known})
    return sorted(
        {
            f"{bound[node.value.id]}.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and _private(node.attr)
        }
    )


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_the_private_name_check_sees_each_form() -> None:
    source = """
from instance_agent.backup import key_values, _free_key
from instance_agent import __version__, _helpers
from . import _sibling
import instance_agent._internal
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from instance_agent.s3upload import _EXISTS_CODES
from os import _exit
"""
    assert sorted(private_imports(ast.parse(source))) == [
        "._sibling",
        "instance_agent._helpers",
        "instance_agent._internal",
        "instance_agent.backup._free_key",
        "instance_agent.s3upload._EXISTS_CODES",
    ]
    used = "from instance_agent.local import autoscaling\nwith autoscaling._lock:\n    autoscaling.LOCK\n"
    assert private_attributes(ast.parse(used), set(modules())) == ["instance_agent.local.autoscaling._lock"]


def test_no_module_imports_another_modules_private_name() -> None:
    # A `_name` is its module's own: one that another module needs is public, named and kept
    # where its concern lives (as s3args.write_args and s3stream.upload_stream are).
    known = modules()
    found = {
        name: bad
        for name, path in known.items()
        if (
            bad := private_imports(tree := ast.parse(path.read_text())) + private_attributes(tree, set(known))
        )
    }
    assert found == {}


def _reachable(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    seen, pending = {start}, [start]
    while pending:
        for nxt in graph[pending.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                pending.append(nxt)
    return seen


def test_the_config_schema_reaches_no_aws_adapter() -> None:
    # The schema's checks (an archive size PartSizer can hold) are arithmetic: reading the
    # config must not need botocore, nor any module that does (config once imported s3upload).
    graph, known = import_graph(), modules()
    aws = ("boto3", "botocore", "requests")
    leaks = {
        name: sorted(found)
        for name in sorted(_reachable(graph, "instance_agent.config"))
        if (
            found := {
                (alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
                for node in _imports(ast.parse(known[name].read_text()))
                for alias in node.names
                if not getattr(node, "level", 0)
            }
            & set(aws)
        )
    }
    assert leaks == {}
    assert "instance_agent.s3upload" not in _reachable(graph, "instance_agent.config")


def test_nothing_imports_the_cli() -> None:
    # cli.py is the top: every command module imports downward, from wiring.py.
    importers = [
        m
        for m, edges in import_graph().items()
        if "instance_agent.cli" in edges and m != "instance_agent.__main__"
    ]
    assert importers == []


def test_the_lambda_stands_alone() -> None:
    # lambda_trigger is deployed without instance_agent (see its __init__).
    graph = import_graph()
    leaks = {
        m: sorted(e for e in edges if e.startswith("instance_agent"))
        for m, edges in graph.items()
        if m.startswith("lambda_trigger")
    }
    assert {m: e for m, e in leaks.items() if e} == {}


def module_map() -> dict[str, set[str]]:
    """docs/architecture.md's module map: module -> the project modules it may import."""
    known = modules()
    text = ARCHITECTURE.read_text().split("## Module map", 1)[1]
    allowed: dict[str, set[str]] = {}

    def resolve(package: str, name: str) -> str:
        full = package if name == "__init__" else f"{package}.{name}"
        return full if full in known else name

    for package, table in re.findall(r"^### `(\w+)`\n(.*?)(?=^#|\Z)", text, re.M | re.S):
        for row in re.findall(r"^\| `([\w.]+)` \|.*\| (.*) \|$", table, re.M):
            name, deps = row
            allowed[resolve(package, name)] = {resolve(package, d) for d in re.findall(r"`([\w.]+)`", deps)}
    return allowed


def test_the_module_map_names_every_module_and_allows_every_import() -> None:
    graph, allowed = import_graph(), module_map()
    assert sorted(allowed) == sorted(graph), "modules missing from (or stale in) the map"
    beyond = {m: sorted(edges.keys() - allowed[m]) for m, edges in graph.items() if edges.keys() - allowed[m]}
    assert beyond == {}, "imports the module map in docs/architecture.md does not allow"
