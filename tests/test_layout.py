"""toot's layout: imports point one way, from the Django modules down to the engine.

Each module's imports are read from its source, those inside functions too, so that a
lazy import cannot hide a cycle or a dependency that runs back up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import toot

PACKAGE = Path(toot.__file__).resolve().parent

# Lower layers first. A module imports from a lower layer, or from its own package; never
# from a higher layer, and never across the publisher's and the subscriber's sides.
LAYERS = [
    ["toot.exceptions", "toot.signals"],
    ["toot.conf"],
    ["toot.models", "toot.protocol"],
    ["toot.engine"],
    ["toot.http", "toot.tracing"],
    ["toot.publisher", "toot.subscriber"],
]


def module_names() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if "migrations" in parts:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = module_names()


def imports_of(name: str) -> set[str]:
    """The toot modules ``name`` imports, anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in MODULES else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {target for target in found if target in MODULES and target != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer_of(name: str) -> tuple[int, str] | None:
    """The layer's rank and the package of the layer that holds ``name``, if any."""
    for rank, packages in enumerate(LAYERS):
        for package in packages:
            if name == package or name.startswith(package + "."):
                return rank, package
    return None  # the Django modules at the top: apps, views, urls, admin, checks...


def test_the_walk_sees_every_part():
    assert {"toot.engine.queue", "toot.publisher.sending", "toot.views"} <= set(GRAPH)
    assert "toot.engine.queue" in GRAPH["toot.engine.drain"]
    assert "toot.models" in GRAPH["toot.publisher.outbox"]  # an import inside a function


def test_no_import_cycles():
    cycles = []

    def walk(name: str, path: list[str], done: set[str]) -> None:
        for target in sorted(GRAPH[name]):
            if target in path:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in done:
                done.add(target)
                walk(target, [*path, target], done)

    for name in sorted(GRAPH):
        walk(name, [name], set())
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if layer_of(n)))
def test_a_lower_layer_never_imports_a_higher_one(name):
    rank, package = layer_of(name)  # type: ignore[misc]
    wrong = []
    for target in sorted(GRAPH[name]):
        layer = layer_of(target)
        if layer is None or (layer[1] != package and layer[0] >= rank):
            wrong.append(target)
    assert not wrong, f"{name} ({package}) imports from above or beside it: {wrong}"


def test_the_app_puts_the_parts_together_once_touching_nothing():
    """The engine learns each side's processor, the publisher's host (its senders) and its
    relay steps (the lanes', the outbox's) from AppConfig.ready(), which may run again (a
    test runner's reload) without doubling them."""
    from django.apps import apps

    from toot.engine import drain, queue, relay
    from toot.publisher import outbox, sending
    from toot.subscriber import handling

    apps.get_app_config("toot").ready()

    assert {queue.OUT: sending.process, queue.IN: handling.process} == drain.PROCESSORS
    assert {queue.OUT: sending.hosting, queue.IN: handling.hosting} == drain.HOSTS
    assert {queue.IN: handling.celery_queue} == drain.ROUTERS
    assert [relay.wake, sending.relay_step, outbox.relay_step] == relay.STEPS


def test_the_drain_task_is_where_celery_looks_for_an_apps_tasks():
    from toot import tasks
    from toot.engine import drain

    assert tasks.drain is drain.drain
    assert tasks.drain.name == "toot.drain"
