"""toot's one Celery task, ``toot.drain``, where Celery's ``autodiscover_tasks()`` looks.

It lives in ``toot.engine.drain``; ``toot.apps`` imports it too, so a project that does
not autodiscover its apps' tasks still has it.
"""

from __future__ import annotations

from toot.engine.drain import drain

__all__ = ["drain"]
