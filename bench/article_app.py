"""The article's Celery application: Celery's defaults, only the broker URL list.

    celery -A bench.article_app worker

This is the article's ``tasks.py`` (``Celery('tasks', broker=BROKER_URL)``, the URL
list in its own order, not rotated) and nothing else: early ack (a task is acked
when it is received), prefetch multiplier 4, no publisher confirms, Celery's
default publish retry policy, the default ``celery`` queue (classic) on a direct
exchange, the prefork pool with one process per CPU.  Mirroring is not a Celery
setting: the benchmark puts the article's ``ha-all`` policy on the vhost.

The task is this project's ``count`` (``app.tasks.count``, same name, same body,
same ledger), registered on this app, so both configurations run the same code.
``CELERY_BROKER_URLS`` (comma-separated) names the nodes, read as this project's
app reads it (``WorkerSettings.from_env``, at the import of ``app.tasks``; that
app is unused here).
"""

from __future__ import annotations

from celery import Celery

from app import tasks as _ours
from app.celery import settings as _settings

# The list as configured (not rotated): the article's order.
BROKER_URLS = list(_settings.broker_urls)

# Created after app.tasks (whose import creates this project's app), so this one is
# the current app in this process.
app = Celery("tasks", broker=BROKER_URLS)

#: The same task function, bound to this app (the class attribute ``run`` of a task is
#: its undecorated function: ``count(self, step_seconds=None)``).
_function = type(_ours.count._get_current_object()).run
count = app.task(bind=True, name=_ours.count.name, shared=False)(_function)

__all__ = ["BROKER_URLS", "app", "count"]
