#!/usr/bin/env python3
"""Developer commands for toot; needs only Python 3.10+ (standard library at the top level).

    python3 dev.py demo [--count N] [--rate R]  the publisher/subscriber demo (.venvs/demo)
    python3 dev.py test [pytest args...]        the test suite with coverage (.venvs/test)
    python3 dev.py test --hiredis [args...]     the same with hiredis (.venvs/test-hiredis)
    python3 dev.py lint                         ruff check, ruff format --check, mypy
    python3 dev.py check-package                build sdist + wheel, install and check the wheel
    python3 dev.py bench [--help | args...]     the end-to-end benchmark (.venvs/bench)
    python3 dev.py docs [sphinx-build args]     the docs into build/docs, warnings as errors
                                                (.venvs/docs, from docs/requirements.txt)

Each command makes its virtualenv under .venvs/ on first use and reuses it until
setup.cfg, pyproject.toml or the Python version changes.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import venv
import zipfile
from pathlib import Path
from typing import Any

# The lowest total branch coverage (percent) that `dev.py test` accepts. The suite
# reaches 100; one point of slack keeps a branch that only timing reaches (a relay
# round, a retry racing a claim) from failing CI on a slow machine.
COVERAGE_FAIL_UNDER = 99

ROOT = Path(__file__).resolve().parent
VENVS = ROOT / ".venvs"
BIN = "Scripts" if os.name == "nt" else "bin"
# Files that must be inside the installed package / the sdist (a `toot/` checkout at the
# repo root hides a missing one from the test suite, see STYLE.md).
PACKAGE_FILES = (
    "py.typed",
    "migrations/__init__.py",
    "management/commands/toot_register_subscriptions.py",
    "testing.py",
    "pytest_plugin.py",
    "templates/admin/toot/overview.html",  # the admin's pages (package data)
)
SDIST_FILES = ("LICENSE", "README.md", "CHANGELOG.md")
CHECK_SETTINGS = """\
SECRET_KEY = "check-package"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "check.sqlite3"}}
INSTALLED_APPS = ["django.contrib.contenttypes", "toot"]
ROOT_URLCONF = "check_urls"
USE_TZ = True
TOOT = {
    "CHANNEL_PREFIX": "org.example.check.",
    "SUBSCRIPTIONS_AUTH": {"TOKENS": ["check-package-token"]},
    "CALLBACK_URL": "https://sub.example.org/toot/callbacks",
    "SOURCES": {
        "publisher": {
            "SUBSCRIPTION_URL": "https://pub.example.org/toot/subscriptions",
            "CHANNEL_PREFIX": "org.example.publisher.",
        },
    },
}

# Loaded with the settings, as a project's package __init__.py loads its app (toot.W006).
from check_celery import app as celery_app  # noqa: E402
"""
CHECK_CELERY = """\
from celery import Celery

app = Celery("check")
app.config_from_object("django.conf:settings", namespace="CELERY")
"""
# Run by the installed venv: toot comes from there, not from the checkout (argv[1]), and
# holds the files argv[2:].
CHECK_INSTALL = """\
import pathlib, sys, toot

package = pathlib.Path(toot.__file__).resolve().parent
if pathlib.Path(sys.argv[1]) in package.parents:
    sys.exit(f"toot was imported from the checkout: {package}")
missing = [name for name in sys.argv[2:] if not (package / name).is_file()]
if missing:
    sys.exit(f"the installed toot lacks {', '.join(missing)}")
print(f"toot {toot.__version__} at {package} holds {', '.join(sys.argv[2:])}")
"""
# The pytest plugin's entry point, as pytest finds it in the installed distribution.
CHECK_PLUGIN = """\
import importlib.metadata, sys

found = [e.value for e in importlib.metadata.entry_points(group="pytest11") if e.name == "toot"]
if found != ["toot.pytest_plugin"]:
    sys.exit(f"the pytest11 entry point of toot is {found}, not toot.pytest_plugin")
import django

django.setup()
import toot.testing  # noqa: E402 - needs no pytest, which this venv does not have

print("pytest11 entry point toot = toot.pytest_plugin; toot.testing imports without pytest")
"""
CHECK_URLS = """\
from django.urls import include, path

urlpatterns = [path("toot/", include("toot.urls"))]
"""


def say(message: str) -> None:
    print(f"dev.py: {message}", flush=True)


def run(*argv: str | Path, check: bool = True, **kwargs: Any) -> int:
    """Run a command, echoing it first; with check, exit with its code if it fails."""
    args = [str(arg) for arg in argv]
    print(f"$ {shlex.join(args)}", flush=True)
    code = subprocess.call(args, **kwargs)
    if check and code != 0:
        say(f"failed with exit code {code}: {shlex.join(args)}")
        sys.exit(code)
    return int(code)


def python_in(env: Path) -> Path:
    return env / BIN / ("python.exe" if os.name == "nt" else "python")


def make_venv(env: Path, clear: bool = False) -> None:
    try:
        venv.EnvBuilder(clear=clear, with_pip=True).create(env)
    except subprocess.CalledProcessError:
        sys.exit(f"dev.py: cannot create {env} with pip (Debian/Ubuntu: apt install python3-venv)")


def ensure_venv(name: str, extra: str) -> Path:
    """.venvs/<name> with toot installed editable with ``extra``; returns its python.

    A stamp file records a hash of the packaging files and the Python version, and the
    extras installed; the venv is rebuilt from scratch when the hash changes.
    """
    env = VENVS / name
    stamp = env / ".toot-stamp"
    digest = hashlib.sha256(sys.version.encode())
    for filename in ("setup.cfg", "pyproject.toml"):
        digest.update((ROOT / filename).read_bytes())
    wanted = digest.hexdigest()
    lines = stamp.read_text().split() if stamp.exists() else []
    if lines[:1] == [wanted] and extra in lines[1:]:
        return python_in(env)
    if lines[:1] != [wanted]:
        say(f"creating {env.relative_to(ROOT)} with {sys.executable} ({sys.version.split()[0]})")
        make_venv(env, clear=True)
        lines = [wanted]
    python = python_in(env)
    run(
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--editable",
        f".[{extra}]",
        cwd=ROOT,
    )
    stamp.write_text("\n".join([*lines, extra]) + "\n")
    return python


def demo(args: list[str]) -> None:
    python = ensure_venv("demo", "example")
    argv = [str(python), str(ROOT / "example_project" / "demo.py"), *args]
    say(f"running {shlex.join(argv)}")
    sys.stdout.flush()
    os.execv(argv[0], argv)


def bench(args: list[str]) -> None:
    python = ensure_venv("bench", "bench-chart")
    argv = [str(python), "-m", "bench", *args]
    say(f"running {shlex.join(argv)}")
    sys.stdout.flush()
    os.chdir(ROOT)  # python -m bench imports bench/ from the checkout
    os.execv(argv[0], argv)


def docs(args: list[str]) -> None:
    """Build the documentation into build/docs; any warning fails the build."""
    env = VENVS / "docs"
    stamp = env / ".toot-stamp"
    requirements = ROOT / "docs" / "requirements.txt"
    # The docs need only Sphinx and its extensions, not toot: no editable install.
    wanted = hashlib.sha256(sys.version.encode() + requirements.read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != wanted:
        say(f"creating {env.relative_to(ROOT)} with {sys.executable} ({sys.version.split()[0]})")
        make_venv(env, clear=True)
        pip: list[str | Path] = [python_in(env), "-m", "pip", "install", "--quiet"]
        run(*pip, "--disable-pip-version-check", "--requirement", requirements)
        stamp.write_text(wanted + "\n")
    out = ROOT / "build" / "docs"
    sphinx: list[str | Path] = [python_in(env), "-m", "sphinx", "-W", "--keep-going", "-b", "html"]
    run(*sphinx, "docs", out, *args, cwd=ROOT)
    say(f"docs built: {out / 'index.html'}")


def test(args: list[str]) -> None:
    if args[:1] == ["--hiredis"]:  # redis-py's C parser, as the README advises for production
        python, args = ensure_venv("test-hiredis", "test,hiredis"), args[1:]
    else:
        python = ensure_venv("test", "test")
    # The same commands as tox.ini's, so a tox env and this agree.
    code = run(
        python,
        "-W",
        "error::DeprecationWarning",
        "-m",
        "coverage",
        "run",
        "-m",
        "pytest",
        *args,
        check=False,
        cwd=ROOT,
    )
    if code != 0:
        say(f"pytest failed with exit code {code}")
        sys.exit(code)
    if args:  # a partial run cannot reach the threshold: report only
        run(python, "-m", "coverage", "report", cwd=ROOT)
    else:
        run(python, "-m", "coverage", "report", f"--fail-under={COVERAGE_FAIL_UNDER}", cwd=ROOT)


def lint(args: list[str]) -> None:
    python = ensure_venv("test", "dev")
    # mypy's Django plugin imports tests.settings, which would start an embedded Redis
    # for no use: give it a URL that nothing connects to.
    environ = {"TOOT_TEST_REDIS_URL": "redis://unused.invalid:6379/0", **os.environ}
    failed = [
        " ".join(command)
        for command in (["ruff", "check"], ["ruff", "format", "--check"], ["mypy"])
        if run(python, "-m", *command, check=False, cwd=ROOT, env=environ) != 0
    ]
    if failed:
        say(f"lint failed: {', '.join(failed)}")
        sys.exit(1)


def check_package(args: list[str]) -> None:
    python = ensure_venv("test", "dev")
    with tempfile.TemporaryDirectory(prefix="toot-check-package-") as tmp_name:
        tmp = Path(tmp_name)
        dist, env, project = tmp / "dist", tmp / "venv", tmp / "project"
        # Without --sdist/--wheel, build makes the wheel from the sdist, which proves
        # that the sdist holds everything needed to build.
        run(python, "-m", "build", "--quiet", "--outdir", dist, ROOT)
        (sdist,) = dist.glob("*.tar.gz")
        (wheel,) = dist.glob("*.whl")

        with tarfile.open(sdist) as archive:
            names = {name.split("/", 1)[-1] for name in archive.getnames()}
        missing = [name for name in SDIST_FILES if name not in names]
        if missing:
            sys.exit(f"dev.py: {sdist.name} lacks {', '.join(missing)}")
        say(f"{sdist.name} holds {', '.join(SDIST_FILES)}")
        with zipfile.ZipFile(wheel) as archive:
            strays = {name.split("/")[0] for name in archive.namelist()} - {
                "toot",
                f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info",
            }
        if strays:
            sys.exit(f"dev.py: {wheel.name} holds more than toot: {', '.join(sorted(strays))}")
        say(f"{wheel.name} holds only the toot package")

        say(f"installing {wheel.name} into a fresh venv {env}")
        make_venv(env)
        run(python_in(env), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel)

        # Run from a directory outside the checkout, with no PYTHONPATH, so that only
        # the installed package can be imported.
        project.mkdir()
        (project / "check_settings.py").write_text(CHECK_SETTINGS)
        (project / "check_urls.py").write_text(CHECK_URLS)
        (project / "check_celery.py").write_text(CHECK_CELERY)
        environ = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        environ |= {"DJANGO_SETTINGS_MODULE": "check_settings", "PYTHONPATH": str(project)}
        (project / "check_install.py").write_text(CHECK_INSTALL)
        run(python_in(env), "check_install.py", str(ROOT), *PACKAGE_FILES, cwd=project, env=environ)
        (project / "check_plugin.py").write_text(CHECK_PLUGIN)
        run(python_in(env), "check_plugin.py", cwd=project, env=environ)
        django_admin = env / BIN / "django-admin"
        run(django_admin, "check", "--fail-level", "WARNING", cwd=project, env=environ)
        run(django_admin, "help", "toot_register_subscriptions", cwd=project, env=environ)
        # The shipped migrations apply and match the models.
        run(django_admin, "migrate", "--noinput", cwd=project, env=environ)
        run(django_admin, "makemigrations", "--check", "--dry-run", cwd=project, env=environ)
    say("package OK")


COMMANDS = {
    "demo": demo,
    "test": test,
    "lint": lint,
    "check-package": check_package,
    "bench": bench,
    "docs": docs,
}


def main(argv: list[str]) -> None:
    if sys.version_info < (3, 10):  # noqa: UP036 - dev.py may be run by any python3
        sys.exit("dev.py: toot needs Python 3.10 or newer")
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        sys.exit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
