"""The documentation: every file it names exists, the configuration page keeps up with
``toot.conf.DEFAULTS``, and the tutorial runs as written.

The tutorial test reads ``docs/tutorial.md`` and does what it says, in its order: it runs
every console block named ``tutorial-*``, writes every file the page includes from
``docs/tutorial/`` where its caption says, edits ``INSTALLED_APPS`` as the named Python
blocks show, and checks the output and log blocks against what the commands and processes
printed. Only the constants a shared machine needs its own of are changed, in the commands
and files alike: the Redis URL (the suite's), the two ports (free ones), and the Redis key
prefixes and Celery queues (this run's).
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import redis
from django.conf import settings

import toot
from devtools.processes import (
    ROOT,
    Process,
    celery_worker_argv,
    free_port,
    wait_for,
    wait_for_http,
)
from tests.http_server import HTTPServer
from toot.conf import DEFAULTS, SOURCE_KEYS

DOCS = ROOT / "docs"
TUTORIAL = DOCS / "tutorial.md"
CONFIGURATION = DOCS / "configuration.md"


# The pages ---------------------------------------------------------------------------


def pages() -> list[Path]:
    """The README, and every page of the docs with what they include."""
    return [
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",  # included by docs/changelog.md
        ROOT / "example_project" / "README.md",
        *sorted(DOCS.rglob("*.md")),
    ]


class Directive(NamedTuple):
    """A MyST directive: ```{name} argument, its :options:, and its content."""

    name: str
    argument: str
    options: dict[str, str]
    content: str


DIRECTIVE = re.compile(
    r"^```\{(?P<name>[\w-]+)\}[ \t]*(?P<argument>[^\n]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S
)
OPTION = re.compile(r":(?P<key>[\w-]+):[ \t]*(?P<value>.*)")


def directives(text: str) -> Iterator[Directive]:
    for match in DIRECTIVE.finditer(text):
        lines = match["body"].split("\n")
        options = {}
        while lines and (option := OPTION.fullmatch(lines[0])):
            options[option["key"]] = option["value"].strip()
            lines.pop(0)
        yield Directive(
            match["name"], match["argument"].strip(), options, "\n".join(lines).strip("\n")
        )


# Files the pages name ------------------------------------------------------------------

# Files of the reader's own project, which the pages name without a folder.
PROJECT_FILES = {
    "__init__.py",
    "apps.py",
    "asgi.py",
    "celery.py",
    "gunicorn.conf.py",  # gunicorn's default configuration file (docs/metrics.md)
    "handlers.py",
    "manage.py",
    "models.py",
    "settings.py",
    "urls.py",
    "wsgi.py",
}
FILE_NAME = re.compile(
    r"(?<![\w./@-])(?P<name>[\w-]+(?:\.[\w-]+)*\.(?:cfg|in|ini|json|md|py|rst|toml|txt|ya?ml))"
    r"(?![\w/-]|\.\w)"  # not a dotted Python path such as django.core.serializers.json.X
)
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def top_level() -> set[str]:
    """The repository's top-level folders."""
    try:
        listed = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: what is there
        listed = [str(path.relative_to(ROOT)) for path in ROOT.glob("*/*")]
    return {name.split("/")[0] for name in listed if "/" in name}


def named_files(page: Path) -> Iterator[tuple[str, Path]]:
    """What ``page`` names as a file of the repository, and where it would be."""
    text = page.read_text()
    for link in LINK.finditer(text):
        target = link["target"].split("#")[0]
        if target and not re.match(r"[a-z][\w+.-]*:", target):  # not https:, mailto:...
            yield target, page.parent / target
    text = LINK.sub("]", text)
    # A path that starts with a folder of the repository, or of the page's own folder
    # (example_project/README.md names example_app/handlers.py).
    bases: dict[str, list[Path]] = {name: [ROOT] for name in top_level()}
    if page.parent != ROOT:
        for folder in filter(Path.is_dir, page.parent.iterdir()):
            bases.setdefault(folder.name, []).append(page.parent)
    folders = "|".join(map(re.escape, sorted(bases)))
    for match in re.finditer(rf"(?<![\w./:@-])(?:{folders})/[\w./-]*", text):
        path = match[0].rstrip(".")
        places = [base / path for base in bases[path.split("/")[0]]]
        yield path, next((place for place in places if place.exists()), places[0])
    for match in FILE_NAME.finditer(text):
        name = match["name"]
        if name not in PROJECT_FILES:
            here = page.parent / name
            yield name, here if here.exists() else ROOT / name


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_every_file_a_page_names_exists(page):
    missing = sorted({name for name, path in named_files(page) if not path.exists()})
    assert not missing, f"{page.relative_to(ROOT)} names files not in the repository: {missing}"


MODULE_NAME = re.compile(r"(?<![\w.])toot(?:\.[A-Za-z_]\w*)+")
# toot's names that are no Python object: the Celery task, and check ids.
NOT_OBJECTS = re.compile(r"toot\.drain|toot\.[EW]\d{3}")


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for name in parts[end:]:
            if not hasattr(found, name):
                return False
            found = getattr(found, name)
        return True
    return False


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_every_toot_module_a_page_names_exists(page):
    """``toot.http.transport.TootAdapter``, a logger such as ``toot.publisher.sending``."""
    names = {match[0] for match in MODULE_NAME.finditer(page.read_text())}
    missing = sorted(
        name for name in names if not NOT_OBJECTS.fullmatch(name) and not resolves(name)
    )
    assert not missing, f"{page.relative_to(ROOT)} names what toot does not hold: {missing}"


# The configuration page ----------------------------------------------------------------

SETTING = re.compile(r"^### `(?P<key>[A-Z_]+)`\n(?P<body>.*?)(?=^#{1,3} |\Z)", re.M | re.S)


def documented_settings() -> dict[str, str]:
    return {match["key"]: match["body"] for match in SETTING.finditer(CONFIGURATION.read_text())}


def as_written(value: object) -> object:
    """A default as a page writes it: tuples as lists."""
    if isinstance(value, (list, tuple)):
        return [as_written(item) for item in value]
    return value


def test_the_configuration_page_documents_every_setting():
    documented = documented_settings()
    assert sorted(set(DEFAULTS) - set(documented)) == [], "settings missing from the page"
    assert sorted(set(documented) - set(DEFAULTS)) == [], "the page documents no such setting"


@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_each_setting_says_its_type_default_and_side(key):
    body = documented_settings().get(key, "")
    assert re.search(r"^:Type: \S", body, re.M), f"{key}: no :Type:"
    assert re.search(r"^:Read by: (the publisher|the subscriber|both sides)\b", body, re.M), key
    default = re.search(r"^:Default: `(?P<value>[^`]+)`", body, re.M)
    assert default, f"{key}: no :Default: `...`"
    assert as_written(ast.literal_eval(default["value"])) == as_written(DEFAULTS[key]), key


def test_the_sources_setting_lists_every_key_of_a_source():
    body = documented_settings()["SOURCES"]
    assert [key for key in SOURCE_KEYS if f"`{key}`" not in body] == []


# The tutorial --------------------------------------------------------------------------

PROGRAMS = {
    "python": [sys.executable],
    "django-admin": [sys.executable, "-m", "django"],
    "celery": [sys.executable, "-m", "celery"],
}
ACTIONS = (", at the end", ", a new file", ", the whole file")


class Tutorial:
    """Does what docs/tutorial.md says, in a folder of its own."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        marker = f"toot-test-{settings.RUN_ID}-tutorial"
        self.marker = marker
        self.constants = {
            "redis://127.0.0.1:6379/0": settings.REDIS_URL,
            "8001": str(free_port()),
            "8002": str(free_port()),
            '"toot:publisher:"': f'"{marker}:publisher:"',
            '"toot:subscriber:"': f'"{marker}:subscriber:"',
            'CELERY_TASK_DEFAULT_QUEUE = "publisher"': f'CELERY_TASK_DEFAULT_QUEUE = "{marker}-p"',
            'CELERY_TASK_DEFAULT_QUEUE = "subscriber"': f'CELERY_TASK_DEFAULT_QUEUE = "{marker}-s"',
        }
        self.replaced: set[str] = set()
        self.processes: dict[str, Process] = {}
        self.output = ""
        self.included: set[Path] = set()

    def ours(self, text: str) -> str:
        """``text`` with this run's constants, in one pass: a port may hold "8002"."""
        constants = sorted(self.constants, key=len, reverse=True)

        def replace(match: re.Match[str]) -> str:
            self.replaced.add(match[0])
            return self.constants[match[0]]

        return re.sub("|".join(map(re.escape, constants)), replace, text)

    def env(self, cwd: Path) -> dict[str, str]:
        project = cwd.name if (cwd / "manage.py").exists() else ""
        return {
            **os.environ,
            # What manage.py and celery.py default to; the suite's own is tests.settings.
            "DJANGO_SETTINGS_MODULE": f"{project}.settings" if project else "",
            # Read before the settings, by toot and Celery: not this shell's.
            "TOOT_REDIS_URL": "",
            "CELERY_BROKER_URL": "",
            # toot as the suite imports it: this checkout.
            "PYTHONPATH": str(Path(toot.__file__).resolve().parent.parent),
        }

    def do(self, directive: Directive) -> None:
        name = directive.options.get("name", "")
        if directive.name == "literalinclude":
            self.include(directive)
        elif directive.name == "code-block" and name.startswith("tutorial-"):
            kind = directive.argument
            if kind == "console":
                self.run(name.removeprefix("tutorial-"), directive.content)
            elif kind == "python" and name.endswith("-apps"):
                self.installed_apps(directive)
            elif kind == "text" and name.endswith("-output"):
                self.expect_output(name, directive)
            elif kind == "text" and name.endswith("-log"):
                self.expect_log(name.removeprefix("tutorial-").removesuffix("-log"), directive)
            else:
                raise AssertionError(f"the test does not know what to do with block {name}")

    def include(self, directive: Directive) -> None:
        source = (DOCS / directive.argument).resolve()
        relative = source.relative_to(DOCS / "tutorial")
        caption = directive.options["caption"]
        action = next((action for action in ACTIONS if caption.endswith(action)), None)
        assert action and caption.removesuffix(action) == str(relative), caption
        target = self.folder / relative
        text = self.ours(source.read_text())
        if action == ", at the end":
            target.write_text(target.read_text() + "\n\n" + text)
        elif action == ", a new file":
            assert not target.exists(), f"{relative} exists already"
            target.write_text(text)
        else:
            assert target.exists(), f"{relative} does not exist yet"
            target.write_text(text)
        self.included.add(source)

    def installed_apps(self, directive: Directive) -> None:
        target = self.folder / directive.options["caption"]
        generated = target.read_text()
        [written] = re.findall(r"^INSTALLED_APPS = \[.*?^\]", generated, re.M | re.S)
        shown = directive.content.strip()
        apps = [ast.literal_eval(code.split("=", 1)[1]) for code in (written, shown)]
        # The page shows what startproject wrote, and adds to its end.
        assert apps[1][: len(apps[0])] == apps[0], apps
        target.write_text(generated.replace(written, shown))

    def run(self, name: str, block: str) -> None:
        cwd = self.folder
        for line in block.splitlines():
            assert line.startswith("$ "), f"{name}: {line!r} is not a command"
            argv = shlex.split(self.ours(line.removeprefix("$ ")))
            if argv[0] == "cd":
                cwd = cwd / argv[1]
                continue
            assert argv[0] in PROGRAMS, f"{name}: the test does not know {argv[0]}"
            argv = PROGRAMS[argv[0]] + argv[1:]
            if "runserver" in argv:
                process = Process(name, argv, self.env(cwd), cwd=cwd, log_dir=self.folder)
                self.processes[name] = process.start()
                wait_for_http(process, f"http://127.0.0.1:{argv[-1]}/")
            elif "worker" in argv:
                process = Process(name, argv, self.env(cwd), cwd=cwd, log_dir=self.folder)
                self.processes[name] = process.start()
                process.wait_for_log(" ready.")
            else:
                result = subprocess.run(
                    argv, cwd=cwd, env=self.env(cwd), capture_output=True, text=True, timeout=60
                )
                assert result.returncode == 0, f"{line}\n{result.stdout}{result.stderr}"
                self.output = result.stdout

    def patterns(self, directive: Directive) -> list[re.Pattern[str]]:
        """A block's lines, each with "…" standing for whatever varies (an id, a time)."""
        return [
            re.compile(".*?".join(map(re.escape, self.ours(line).split("…"))))
            for line in directive.content.splitlines()
        ]

    def expect_output(self, name: str, directive: Directive) -> None:
        """Each line the page shows is a line the last command printed (Django's shell
        may print more)."""
        printed = self.output.splitlines()
        for pattern in self.patterns(directive):
            assert any(pattern.fullmatch(line) for line in printed), (name, self.output)

    def expect_log(self, name: str, directive: Directive) -> None:
        process = self.processes[name]
        patterns = self.patterns(directive)

        def logged() -> bool:
            log = process.log()
            return all(pattern.search(log) for pattern in patterns)

        wait_for(logged, 30, f"{name} to log {directive.content}")

    def stop(self) -> None:
        for process in reversed(self.processes.values()):
            process.stop()
        client = redis.Redis.from_url(settings.REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"*{self.marker}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}\n{process.log()[-3000:]}" for name, process in self.processes.items()
        )


def test_the_tutorial_delivers_its_event(tmp_path):
    tutorial = Tutorial(tmp_path)
    steps = list(directives(TUTORIAL.read_text()))
    try:
        for step in steps:
            tutorial.do(step)
    except BaseException:
        print(tutorial.logs())
        raise
    finally:
        tutorial.stop()
    shown = {step.options.get("name") for step in steps}
    assert {"tutorial-subscriber-worker-log", "tutorial-register-output"} <= shown
    assert tutorial.included == set((DOCS / "tutorial").rglob("*.py")), "files the page omits"
    assert tutorial.replaced == set(tutorial.constants), "constants the page no longer has"


def test_the_testing_page_shows_only_tests_that_run():
    """docs/testing.md shows the sample and the example projects' tests, which
    tests/test_testing.py runs, and a failure message: no code of its own."""
    page = (DOCS / "testing.md").read_text()
    included = {
        (DOCS / directive.argument).resolve()
        for directive in directives(page)
        if directive.name == "literalinclude"
    }
    assert included == {
        ROOT / "tests" / "sample_project" / "accounts" / "tests" / "test_with_pytest.py",
        ROOT / "tests" / "sample_project" / "accounts" / "tests" / "test_with_testcase.py",
        ROOT / "example_project" / "example_app" / "tests.py",
    }
    assert re.findall(r"^```(\w+)", page, re.M) == ["text"]  # the failure message


# The logging page ------------------------------------------------------------------------

LOGGING_EXAMPLE = DOCS / "examples" / "logging_settings.py"
LOG_LINE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO "


def test_the_logging_page_shows_its_setting_whole():
    included = [
        (DOCS / d.argument).resolve()
        for d in directives((DOCS / "logging.md").read_text())
        if d.name == "literalinclude"
    ]
    assert included == [LOGGING_EXAMPLE]


def test_the_logging_setting_shows_toot_s_lines_in_a_web_process_and_a_worker(tmp_path):
    """The page's LOGGING in a project's settings: a process that publishes (as a web
    process would) and a Celery worker started at its default --loglevel, WARNING, both
    print toot's INFO lines."""
    marker = f"toot-test-{settings.RUN_ID}-logging"
    (tmp_path / "logging_project.py").write_text(
        "from tests.settings import *  # noqa: F403\n"
        f"exec(open({str(LOGGING_EXAMPLE)!r}).read())\n"
        f"CELERY_TASK_DEFAULT_QUEUE = {marker!r}\n"
        f"TOOT = {{**TOOT, 'KEY_PREFIX': {marker + ':'!r}}}  # noqa: F405\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "logging_project",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
    }
    channel = f"org.example.test.logging.{uuid.uuid4().hex[:8]}.v1"
    worker = Process(
        "logging-worker",
        celery_worker_argv("tests.celery", f"{marker}@%h", 1, pool="threads", loglevel="WARNING"),
        env,
        log_dir=tmp_path,
    )
    try:
        with HTTPServer() as peer:
            # At WARNING a worker does not say it is ready: the drain's message waits for it.
            worker.start()
            published = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import django; django.setup()\n"
                    "import tests.celery, toot\n"
                    "from toot.publisher import store\n"
                    f"store.add({channel!r}, {peer.url!r})\n"
                    f"print(toot.publish('', {{'id': 1}}, prefix={channel!r}).id)\n",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert published.returncode == 0, published.stderr
            event_id = published.stdout.strip()
            assert re.search(
                LOG_LINE + rf"toot\.publisher\.publishing Event {event_id} on {channel}: "
                r"published$",
                published.stderr,
                re.M,
            ), published.stderr
            delivered = (
                LOG_LINE + rf"toot\.publisher\.sending Event {event_id} on {channel}: "
                rf"delivered to {re.escape(peer.url)} \(status 200, attempt 1\)$"
            )
            wait_for(
                lambda: not worker.running or re.search(delivered, worker.log(), re.M),
                60,
                "the worker's toot line",
            )
            assert worker.running, worker.log()
            # toot's INFO lines, and none of Celery's own: the worker is at WARNING.
            assert " ready." not in worker.log()
    finally:
        worker.stop()
        client = redis.Redis.from_url(settings.REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"{marker}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


def test_the_tracing_page_shows_the_example_s_setup_that_the_end_to_end_test_runs():
    # tests/test_end_to_end.py follows a trace across processes with this very function.
    included = [
        ((DOCS / d.argument).resolve(), d.options.get("pyobject"))
        for d in directives((DOCS / "tracing.md").read_text())
        if d.name == "literalinclude"
    ]
    example = ROOT / "example_project" / "example_project"
    assert included == [((example / "tracing.py").resolve(), "export_spans_to")]
    for role in ("publisher", "subscriber"):
        settings_text = (example / f"{role}.py").read_text()
        assert f'export_spans_to(TRACE_FILE, "{role}")' in settings_text
        assert '"TRACING": bool(TRACE_FILE),' in settings_text
