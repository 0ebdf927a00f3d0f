"""The layout the architecture promises, read from the source with `ast`: no import cycle among
the modules of gateway, upstreams and cache (imports under TYPE_CHECKING and inside functions
count); nothing below the plan sees the config layer; the core sees nothing above it; and no
module is over MAX_LINES long but those listed here, each with its reason."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "upstreams", "cache")
MAX_LINES = 400

LONG_MODULES = {
    "gateway/demo/simulator.py": "the one fake upstream: its two faces (the demo's services, the "
    "scripted server of tests, bench and reliability) share one server and its handlers",
    "cache/redis.py": "one class, RedisStore, whose operations are a few lines each and share the "
    "one _run boundary (timeout, Cluster admission, error translation) a reader must see beside "
    "them; its scripts and clients are modules of their own",
}
"""Modules allowed past MAX_LINES, and why."""


def module_files() -> dict[str, Path]:
    """Return each module of PACKAGES by dotted name (a package by its own name)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = module_files()


def imported(name: str, path: Path) -> Iterator[str]:
    """Yield every name `name` (at `path`) imports, anywhere in its source, absolute."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from cache import entry` imports that module; `from cache import X`, the package.
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base


GRAPH = {name: sorted(set(imported(name, path))) for name, path in MODULES.items()}
"""Each module and every name it imports (modules of ours, or other distributions)."""


def edges(name: str) -> list[str]:
    return [target for target in GRAPH[name] if target in MODULES and target != name]


def cycles() -> list[list[str]]:
    """Return the strongly connected components of the graph of our modules that hold a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges(node):
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
            if len(component) > 1:
                found.append(sorted(component))

    for node in MODULES:
        if node not in index:
            visit(node)
    return found


def imports_of(prefix: str) -> dict[str, list[str]]:
    """Return, for each module under `prefix`, what it imports."""
    return {n: t for n, t in GRAPH.items() if n == prefix or n.startswith(prefix + ".")}


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_is_read_from_the_source() -> None:
    assert "gateway.runtime" in GRAPH["gateway.app"]  # `from gateway import runtime`
    assert "gateway.edge.server" in GRAPH["gateway.cli"]  # inside a function
    assert "gateway.runtime" in GRAPH["gateway.ops.admin"]  # under TYPE_CHECKING
    assert "pydantic" in GRAPH["gateway.config.schema"]


def test_no_import_cycle_among_modules() -> None:
    assert cycles() == []


def test_upstreams_and_cache_never_see_the_config_layer() -> None:
    leaks = {
        name: [t for t in targets if under(t, "gateway.config", "pydantic")]
        for package in ("upstreams", "cache")
        for name, targets in imports_of(package).items()
    }
    assert {name: found for name, found in leaks.items() if found} == {}


def test_upstreams_see_only_the_core_of_gateway_and_cache_nothing_of_it() -> None:
    def leaks(package: str, allowed: tuple[str, ...]) -> dict[str, list[str]]:
        found = {
            name: [t for t in targets if under(t, "gateway") and not under(t, *allowed)]
            for name, targets in imports_of(package).items()
        }
        return {name: targets for name, targets in found.items() if targets}

    assert leaks("upstreams", ("gateway.core",)) == {}
    assert leaks("cache", ()) == {}


def test_the_core_imports_nothing_above_it() -> None:
    above = ("gateway.edge", "gateway.ops", "gateway.demo")
    leaks = {n: [t for t in ts if under(t, *above)] for n, ts in imports_of("gateway.core").items()}
    assert {name: found for name, found in leaks.items() if found} == {}


def test_no_module_is_long_but_those_listed_with_a_reason() -> None:
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in MODULES.values()}
    long = {path for path, lines in lengths.items() if lines > MAX_LINES}
    assert long == set(LONG_MODULES), {path: lengths.get(path) for path in long ^ set(LONG_MODULES)}
