"""ftd's modules import one another without cycles, counting every import: at the top, inside
functions (lazy) and under `if TYPE_CHECKING:`, so a cycle cannot hide behind a late import."""

from __future__ import annotations

import ast
from pathlib import Path

import ftd

ROOT = Path(ftd.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py") if "_proto" not in p.parts}


def import_graph() -> dict[str, set[str]]:
    """Module -> the ftd modules it imports anywhere in its text."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for target in targets:
                if target.startswith("ftd._proto"):  # generated code, imports nothing of ftd
                    continue
                while target and target not in modules:  # `import ftd.a.b.c` of a name: its module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_ftd_has_no_import_cycles() -> None:
    graph = import_graph()
    assert "ftd.daemon.protection" in graph and "ftd.daemon.store" in graph["ftd.daemon.protection"]
    assert cycles(graph) == []


def test_importing_ftd_imports_no_framework() -> None:
    """`import ftd`, the integrations package and the CLI import neither transformers nor Lightning (the
    trainer API's modules are checked by the static test below, without paying for torch here)."""
    import subprocess
    import sys

    code = ("import sys, ftd, ftd.integrations, ftd.cli, ftd.logs;"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate', 'lightning',"
            " 'pytorch_lightning', 'lightning_fabric'));"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", out.stdout


def test_only_the_integration_modules_import_frameworks() -> None:
    frameworks = ("transformers", "accelerate", "lightning", "pytorch_lightning", "lightning_fabric")
    allowed = {"ftd.integrations.transformers": {"transformers"},
               "ftd.integrations.lightning": {"lightning", "pytorch_lightning"}}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                tops = {(node.module or "").split(".")[0]}
            else:
                continue
            used = tops & set(frameworks)
            assert used <= allowed.get(name, set()), f"{name} imports {used}"
