"""The Celery app. Tasks take ids, never model instances, and are queued after commit."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("rlhf")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
