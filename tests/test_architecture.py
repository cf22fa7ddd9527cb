"""The shape of the package: no import cycle among ``connguard.*`` modules.

Every import counts, those inside functions too (a deferred import is still a dependency);
only ``if TYPE_CHECKING:`` blocks do not. Read from the source with ``ast``, so a cycle is
found whether or not the modules involved import cleanly here.
"""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

from tests.netns import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "connguard")


def modules() -> Dict[str, str]:
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path[:-3], REPO_ROOT).replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"))


def imports_of(path: str, known: Set[str]) -> Set[str]:
    """The connguard modules ``path`` imports (``from connguard import x`` names module x)."""
    found: Set[str] = set()
    with open(path) as f:
        stack: List[ast.AST] = [ast.parse(f.read())]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs
            if node.module in known and len(subs) < len(node.names):
                found.add(node.module)
        stack.extend(ast.iter_child_nodes(node))
    return found


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_connguard_modules() -> None:
    known = modules()
    graph = {name: imports_of(path, set(known)) - {name} for name, path in known.items()}
    assert "connguard.pool" in graph and "connguard.errors" in graph["connguard.pool"]
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(
        " <-> ".join(group) + " (" + ", ".join(
            f"{v} -> {sorted(graph[v] & set(group))}" for v in group) + ")" for group in found)


# CPython (3.11+) keeps an instance's attributes in a compact layout shared by its class only
# while there are at most 30 of them (SHARED_KEYS_MAX_SIZE); past that every instance gets a
# plain dict and each ``self.x`` on the hot path is a slower lookup (an attribute load that
# cannot be specialized). How much that costs hides in the method-cache layout's own spread
# of a few percent (docs/architecture.md, "What a split may cost"): the limit is kept as
# CPython states it rather than as one measurement showed it.
MAX_HOT_ATTRIBUTES = 30
#: connguard.Pool and the parts it is built from (mixins of the one object).
POOL_PARTS = (("pool", "Pool"), ("pool_connect", "ConnectPath"), ("pool_return", "ReturnPath"),
              ("pool_upkeep", "Upkeep"), ("pool_stats", "PoolReport"))

#: connguard.sqlalchemy_pool.GuardedQueuePool and its parts (the async pool adds two).
GUARDED_POOL_PARTS = (("sqlalchemy_pool", "GuardedQueuePool"),
                      ("sqlalchemy_pool_inplace", "ReconnectInPlace"),
                      ("sqlalchemy_pool_upkeep", "PoolUpkeep"),
                      ("sqlalchemy_pool_stats", "GuardedPoolReport"),
                      ("sqlalchemy_async_pool", "GuardedAsyncQueuePool"))


def attributes_set(path: str, class_name: str) -> set:
    """Names assigned as ``self.<name>`` anywhere in ``class_name``'s methods."""
    with open(path) as f:
        tree = ast.parse(f.read())
    classes = [node for node in ast.walk(tree)
               if isinstance(node, ast.ClassDef) and node.name == class_name]
    assert classes, f"{class_name} not found in {path}"
    names = set()
    for sub in ast.walk(classes[0]):
        targets = (sub.targets if isinstance(sub, ast.Assign) else
                   [sub.target] if isinstance(sub, (ast.AnnAssign, ast.AugAssign)) else [])
        for target in targets:
            for leaf in ast.walk(target):
                if (isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name)
                        and leaf.value.id == "self"):
                    names.add(leaf.attr)
    return names


def test_hot_classes_keep_the_compact_attribute_layout() -> None:
    import sqlalchemy

    # An engine with the plugin, never connected: its pool with what SQLAlchemy sets on it.
    engine = sqlalchemy.create_engine("mysql+pymysql://app@127.0.0.1:1/app?plugin=connguard")
    queue_pool = engine.pool
    counts = {
        "Pool": len(set().union(*(attributes_set(os.path.join(PACKAGE, f"{module}.py"), name)
                                  for module, name in POOL_PARTS))),
        "EngineGuard": len(attributes_set(os.path.join(PACKAGE, "sqlalchemy_plugin.py"),
                                          "EngineGuard")),
        "GuardedQueuePool": len(set(vars(queue_pool)).union(*(
            attributes_set(os.path.join(PACKAGE, f"{module}.py"), name)
            for module, name in GUARDED_POOL_PARTS))),
    }
    assert counts["Pool"] > 20  # the checker sees them
    over = {name: n for name, n in counts.items() if n > MAX_HOT_ATTRIBUTES}
    engine.dispose()
    assert not over, f"over {MAX_HOT_ATTRIBUTES} instance attributes: {over}"
