"""A minimal Django project around README.md's Django blocks, for tests/test_readme.py.

    python django_project.py DIR

DIR holds settings.py and views.py: the README's two blocks, as written. This script runs the
settings block, replaces its `...` entries with what a project has there (the apps and the
session middleware that signing in needs), configures Django with every setting the block
defines plus a database, routes /upgrade and /export to the views block's views, and calls them
with Django's test clients for a signed-in user (the sync client: WSGI; the async one: ASGI)
and for nobody. It prints one `RESULT {json}` line: the user's pk, the statuses, what the
system check said and the client's stats after shutdown.
"""

from __future__ import annotations

import asyncio
import json
import runpy
import sys
from pathlib import Path
from typing import Any

import django
from django.conf import settings

HERE = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(HERE))

# What a project's settings.py holds where the README's block writes `...`.
PROJECT_APPS = ["django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions"]
PROJECT_MIDDLEWARE = ["django.contrib.sessions.middleware.SessionMiddleware"]


def filled(entries: list[Any], project: list[str]) -> list[Any]:
    """The block's list with its one `...` entry replaced by the project's entries."""
    assert entries.count(Ellipsis) == 1, entries
    where = entries.index(Ellipsis)
    return [*entries[:where], *project, *entries[where + 1 :]]


block = {k: v for k, v in runpy.run_path(str(HERE / "settings.py")).items() if k.isupper()}
block["INSTALLED_APPS"] = filled(block["INSTALLED_APPS"], PROJECT_APPS)
block["MIDDLEWARE"] = filled(block["MIDDLEWARE"], PROJECT_MIDDLEWARE)
PROJECT = {  # the rest of a project's settings.py; the block's settings win
    "SECRET_KEY": "readme-test-only",
    "ALLOWED_HOSTS": ["testserver"],
    "ROOT_URLCONF": "__main__",
    "DATABASES": {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": "file:whisperr_readme?mode=memory&cache=shared",
        }
    },
    "USE_TZ": True,
}
settings.configure(**(PROJECT | block))
django.setup()

from django.contrib.auth.models import User  # noqa: E402  (after django.setup())
from django.core.management import call_command  # noqa: E402
from django.test import AsyncClient, Client  # noqa: E402
from django.urls import path  # noqa: E402
from views import export, upgrade  # type: ignore[import-not-found]  # noqa: E402  (the block)

from whisperr.django import get_client  # noqa: E402

urlpatterns = [path("upgrade", upgrade), path("export", export)]

call_command("migrate", verbosity=0)
call_command("check")  # WhisperrConfig's check: raises SystemCheckError on an error
ada = User.objects.create_user("ada")
wsgi = Client()
wsgi.force_login(ada)
asgi = AsyncClient()
asgi.force_login(ada)


async def under_asgi() -> list[int]:
    return [(await asgi.post("/upgrade")).status_code, (await asgi.post("/export")).status_code]


statuses = {
    "wsgi": [wsgi.post("/upgrade").status_code, wsgi.post("/export").status_code],
    "asgi": asyncio.run(under_asgi()),
    "anonymous": [Client().post("/upgrade").status_code, Client().post("/export").status_code],
}
get_client().shutdown(timeout=10)
stats = get_client().stats()
result = {
    "user": str(ada.pk),
    "statuses": statuses,
    "stats": {
        "tracked": stats.tracked,
        "delivered": stats.delivered,
        "dropped_by_reason": dict(stats.dropped_by_reason),
    },
}
print("RESULT " + json.dumps(result), flush=True)
