"""The Celery application: ``celery -A app.celery worker``.

Configured only from :func:`app.settings.celery_config` applied to the
environment (see :mod:`app.settings` for the variables).
"""

from __future__ import annotations

from celery import Celery

from app.settings import WorkerSettings, celery_config

settings = WorkerSettings.from_env()

app = Celery("app", include=["app.tasks"])
app.conf.update(celery_config(settings))

__all__ = ["app", "settings"]
