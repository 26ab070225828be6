"""The package's module-level imports form no cycle (lazy imports inside functions are allowed:
they run after every module is loaded)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flux"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """flux modules imported at module level (not inside functions / TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    pkg = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]

    def visit(body):
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
            if isinstance(node, ast.Import):
                for a in node.names:
                    found.add(a.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                found.add(base)
                for a in node.names:  # `from flux import ops` imports the submodule flux.ops
                    if f"{base}.{a.name}" in modules:
                        found.add(f"{base}.{a.name}")

    visit(tree.body)
    out = set()
    for name in found:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        deps = _top_level_imports(path, modules)
        # importing a.b.c runs a/__init__ and a/b/__init__ first, except the packages the
        # importing module lives in (they are already being imported: the usual pattern)
        own = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        parents = set()
        for d in deps:
            parts = d.split(".")
            parents |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules}
        graph[name] = (deps | parents) - {name} - own
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = _graph()
    assert "flux.federation.config" in graph and "flux.methods.api" in graph
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_method_api_imports_no_concrete_method():
    graph = _graph()
    concrete = {"flux.methods.fedavg", "flux.methods.fmd", "flux.methods.fmq", "flux.methods.fmes", "flux.methods.flux"}
    for leaf in ("flux.methods.api", "flux.methods.registry", "flux.federation.update", "flux.federation.errors"):
        assert not graph[leaf] & concrete, (leaf, graph[leaf] & concrete)
    assert graph["flux.methods.registry"] <= {"flux", "flux.methods"}, graph["flux.methods.registry"]
