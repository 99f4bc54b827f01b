"""Sphinx configuration of toot's documentation: ``python3 dev.py docs`` builds it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Read, not imported: the docs build needs neither Django nor toot installed.
VERSION = re.search(r'^__version__ = "(.+)"$', (ROOT / "toot" / "__init__.py").read_text(), re.M)

project = "toot"
author = "toot's maintainers"
copyright = "toot's maintainers"
release = version = VERSION[1] if VERSION else "unknown"

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
myst_enable_extensions = ["deflist", "fieldlist"]
# Anchors for headings down to ###, so that a page can link to one setting.
myst_heading_anchors = 3
# docs/tutorial/ holds the tutorial's project files, which its page includes.
exclude_patterns = ["_build", "tutorial"]
nitpicky = True

html_theme = "furo"
html_title = f"toot {release}"
