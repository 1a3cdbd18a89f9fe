"""A tiny Django project that reports to Whisperr through ``whisperr.django`` (views: urls.py).

Try it against the bundled local server, from this folder:

    python -m whisperr.server --port 8787 --api-key wrk_local &
    export WHISPERR_API_KEY=wrk_local WHISPERR_BASE_URL=http://127.0.0.1:8787
    python manage.py migrate
    gunicorn wsgi:application --bind 127.0.0.1:8000 --workers 2
    curl http://127.0.0.1:8000/reports/revenue

A request with nobody signed in tracks nothing (the event is counted as dropped, "anonymous");
sign users in as your project does. The test suite (tests/test_django.py) serves this project
with gunicorn and signs users in with Django's test client.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "whisperr.django.WhisperrConfig",  # optional: `manage.py check` reports a missing key
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "whisperr.django.WhisperrMiddleware",  # after AuthenticationMiddleware: it reads request.user
]
ROOT_URLCONF = "urls"
WSGI_APPLICATION = "wsgi.application"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_DB", BASE_DIR / "db.sqlite3"),
    }
}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Whisperr. A setting left out (or None) falls back to its WHISPERR_* environment variable,
# so these two lines only make that visible; without a base URL the real API is used.
WHISPERR_API_KEY = os.environ.get("WHISPERR_API_KEY")
WHISPERR_BASE_URL = os.environ.get("WHISPERR_BASE_URL")
WHISPERR_APP_VERSION = "1.4.0"
