"""The package's import graph, read from the source (AST, function-local imports counted): no cycle, and imports flow
one way, command line -> tools -> launcher -> training -> distributed -> shared pieces -> engine/data -> base.

A module may import its own layer or any layer below it, never one above: that is what lets a reader take in
`dptrain/` top-down, and what keeps a tool's helper from being reached by the training loop."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "dptrain"

# (layer, module-name prefixes), highest first. A name matches its longest prefix.
LAYERS = [
    (8, ["dptrain.cli", "dptrain.__main__"]),
    (7, ["dptrain.bench", "dptrain.plan", "dptrain.soak", "dptrain.inference"]),
    (6, ["dptrain.flags"]),
    (5, ["dptrain.launcher"]),
    (4, ["dptrain.train", "dptrain.board", "dptrain.metrics", "dptrain.saver"]),
    (3, ["dptrain.distributed"]),
    (2, ["dptrain.executors", "dptrain.compute", "dptrain.optim", "dptrain.ema", "dptrain.checkpoint"]),
    (1, ["dptrain.nn", "dptrain.data"]),
    (0, ["dptrain.config", "dptrain.log", "dptrain.fsutil", "dptrain"]),
]


def layer_of(name: str) -> int:
    best, layer = -1, None
    for n, prefixes in LAYERS:
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), n
    assert layer is not None, name
    return layer


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def import_graph() -> dict[str, dict[str, int]]:
    mods = modules()
    graph = {}
    for name, p in mods.items():
        pkg = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: dict[str, int] = {}
        for n in ast.walk(ast.parse(p.read_text(), str(p))):
            targets = []
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg import mod` names a module; `from mod import name` names the module alone
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in n.names]
            for t in targets:
                if t in mods and t != name:
                    found.setdefault(t, n.lineno)
        graph[name] = found
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1}}) is None


def test_imports_flow_one_way():
    graph = import_graph()
    upward = [f"{PKG.parent / (src.replace('.', '/'))}.py:{line}: {src} (layer {layer_of(src)}) imports {dst} "
              f"(layer {layer_of(dst)})"
              for src, targets in graph.items() for dst, line in targets.items() if layer_of(dst) > layer_of(src)]
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_top_level_stays_small():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 16, top
