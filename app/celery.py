"""The Celery application: ``celery -A app.celery worker``.

Configured only from :func:`app.settings.celery_config` applied to the
environment (see :mod:`app.settings` for the variables).  A bad value stops the
process at import, before Celery starts: one line on stderr naming the variable,
the value (passwords masked) and what is allowed, exit status 2, no traceback
(``celery`` would otherwise print the traceback of the failed import).

Every task is an :class:`app.publish.BudgetedTask`: publishing it retries for the
publish retry budget (``CELERY_PUBLISH_RETRY_SECONDS``).
"""

from __future__ import annotations

from celery import Celery

from app import metrics
from app.publish import BudgetedTask
from app.settings import celery_config, settings_or_exit

settings = settings_or_exit("app.celery")


class ClusterTask(BudgetedTask):
    """This app's task base class: the publish budget from this environment."""

    publish_retry_seconds = settings.publish_retry_seconds


app = Celery("app", include=["app.tasks"], task_cls=ClusterTask)
app.conf.update(celery_config(settings))
worker_metrics = metrics.install(settings.metrics_port)

__all__ = ["app", "settings"]
