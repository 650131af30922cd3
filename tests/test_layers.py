"""The import direction of the rings (docs/INTERNALS.md, the design note), read from the source.

Every `pop3d/*.py` is parsed with `ast`: imports at module level and inside functions alike
(a lazy import is still a dependency), `TYPE_CHECKING` blocks excepted (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pop3d"

# The pure core: bytes in, replies and requests out; no os, sockets, files, clock or logging.
CORE = {"limits", "wire", "protocol", "proxyheader"}
# The drivers: own a connection or a process, perform what the core asks through the adapters.
DRIVERS = {"cli", "__main__", "server", "dispatch", "session", "privsep", "transport", "login", "proxied"}
# Every other module is an adapter (mbox, bulk, locking, maildrop, auth, privs, tls, passwd,
# config, log, ...): it touches the world and knows nothing of POP3.


def modules() -> dict[str, set[str]]:
    """Module name -> the pop3d modules it imports, anywhere in it."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        if name == "__init__":
            continue
        graph[name] = _imports(ast.parse(path.read_text(), str(path)), name)
    return graph


def _imports(tree: ast.AST, name: str) -> set[str]:
    found: set[str] = set()
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pop3d."):
                    found.add(alias.name.split(".")[1])
        elif isinstance(node, ast.ImportFrom):
            if (node.level == 0 and node.module == "pop3d") or (node.level == 1 and not node.module):
                found.update(alias.name for alias in node.names)  # from pop3d import x / from . import x
            elif node.level == 0 and node.module and node.module.startswith("pop3d."):
                found.add(node.module.split(".")[1])
            elif node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
    found.discard(name)
    found.discard("__version__")
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def test_the_parser_sees_lazy_and_relative_imports() -> None:
    source = (
        "from pop3d import a, b\nimport pop3d.c\nfrom pop3d.d import x\nfrom . import e\nfrom .f import y\n"
        "def later():\n    from pop3d import g\n"
        "if TYPE_CHECKING:\n    from pop3d import h\n"
    )
    assert _imports(ast.parse(source), "me") == {"a", "b", "c", "d", "e", "f", "g"}


def test_every_listed_module_exists() -> None:
    graph = modules()
    assert graph.keys() >= CORE
    assert graph.keys() >= DRIVERS, "a driver listed here was renamed or removed: update DRIVERS"


def test_the_core_imports_only_the_core() -> None:
    graph = modules()
    wrong = {name: sorted(graph[name] - CORE) for name in CORE if graph[name] - CORE}
    assert not wrong, f"the core imports adapters or drivers: {wrong}"


def test_adapters_import_no_core_module_but_limits_and_no_driver() -> None:
    graph = modules()
    forbidden = (CORE - {"limits"}) | DRIVERS
    wrong = {
        name: sorted(imported & forbidden)
        for name, imported in graph.items()
        if name not in CORE | DRIVERS and imported & forbidden
    }
    assert not wrong, (
        f"adapters import the core or a driver: {wrong} "
        "(a new module that drives a session belongs in DRIVERS, with its contract in docs/INTERNALS.md)"
    )


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each cycle found by a depth-first walk, as "a -> b -> a"."""
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for other in sorted(graph.get(name, ())):
            if state.get(other) == 1:
                cycles.append(" -> ".join([*path[path.index(other) :], other]))
            elif other not in state:
                visit(other)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return cycles


def test_no_import_cycle() -> None:
    cycles = find_cycles(modules())
    assert not cycles, f"import cycles among pop3d's modules: {cycles}"


def test_the_cycle_check_finds_a_planted_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
