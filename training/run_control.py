"""How a worker holds a TrainingRun: claim it, beat its heartbeat, report progress, notice a cancel.

The durable-run contract (see annotation.services.runs for the other half):
- `run_claim` takes a queued run, or a running one whose heartbeat stopped (its worker died), under a row lock;
  any other state means another worker holds it or it is done, and the message is dropped. So a re-delivered or
  re-sent message never runs a run twice.
- While it works, a thread beats `heartbeat_at` every RUN_HEARTBEAT_SECONDS and reads the status: a cancel (or
  another worker having taken the run over) is seen within one beat and raised at the next progress report,
  that is within one step.
- Every stage writes its checkpoints in the run's own directory and resumes from them, so a run started again
  by another worker goes on where the dead one stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.utils import timezone

from annotation.models import RunStatus, TrainingRun

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
log = logging.getLogger(__name__)


class RunCancelled(Exception):
    """The run's row was marked cancelled while it worked."""


class RunTakenOver(Exception):
    """Another worker claimed the run (this one's heartbeat was late): this one stops without writing."""


def run_claim(run_id: int, task_id: str = "") -> TrainingRun | None:
    """The run, marked running by this worker, if it is queued or its holder's heartbeat stopped; else None."""
    stale = timezone.now() - timedelta(seconds=settings.RUN_STALE_SECONDS)
    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().filter(pk=run_id).first()
        if run is None:
            return None
        dead = run.status == RunStatus.RUNNING and (run.heartbeat_at or run.started_at or timezone.now()) < stale
        if run.status != RunStatus.QUEUED and not dead:
            return None
        now = timezone.now()
        run.status, run.heartbeat_at, run.worker = RunStatus.RUNNING, now, WORKER_ID
        run.started_at = run.started_at or now
        run.attempts += 1
        run.celery_task_id = task_id or run.celery_task_id
        run.save(update_fields=["status", "heartbeat_at", "worker", "started_at", "attempts", "celery_task_id"])
        return run


# Parameters that name rows or say where data come from; the rest are the stage config's own fields.
PLATFORM_KEYS = {"policy", "policy_b", "prompts", "batches", "name", "world_size", "reward_model",
                  "safety_reward_model", "pool", "baseline", "make_current", "pending", "batch", "overlap",
                  "test_size", "temperatures", "adjusted", "stage", "campaign"}  # fmt: skip

def config_fields(params: dict[str, Any], config_class: type) -> dict[str, Any]:
    """The params that are fields of the stage's config dataclass."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return {k: v for k, v in params.items() if k in names and k not in PLATFORM_KEYS}


def run_dir(run: TrainingRun) -> Path:
    """The run's own directory under ARTIFACTS_DIR: where its stage writes, checkpoints and resumes."""
    path = Path(settings.ARTIFACTS_DIR) / "runs" / f"{run.pk}-{run.kind}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class RunControl:
    """A claimed run's heartbeat thread and progress reports; use as a context manager around the work."""

    run_id: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    report_every_s: float = 2.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _taken_over: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _last_write: float = 0.0

    def __enter__(self) -> RunControl:
        self._thread = threading.Thread(target=self._beat, name=f"run-{self.run_id}-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _beat(self) -> None:
        try:
            while not self._stop.wait(settings.RUN_HEARTBEAT_SECONDS):
                try:
                    close_old_connections()  # this thread's own connection: reopen it if the database dropped it
                    self.beat()
                except Exception:  # a database restart: keep beating, or a live run would look dead
                    log.warning("run %s: heartbeat failed; trying again", self.run_id, exc_info=True)
        finally:
            connection.close()  # this thread's own connection

    def beat(self) -> None:
        """Write the heartbeat if this worker still holds the run; note a cancel or a take-over."""
        held = TrainingRun.objects.filter(pk=self.run_id, status=RunStatus.RUNNING, worker=WORKER_ID)
        if held.update(heartbeat_at=timezone.now()):
            return
        row = TrainingRun.objects.filter(pk=self.run_id).values("status", "worker").first()
        if row is None or row["status"] == RunStatus.CANCELLED:
            self._cancelled.set()
        elif row["worker"] != WORKER_ID or row["status"] != RunStatus.RUNNING:
            self._taken_over.set()

    def check(self) -> None:
        """Raise where the run was cancelled or taken over; call between steps."""
        if self._cancelled.is_set():
            raise RunCancelled(f"run {self.run_id} was cancelled")
        if self._taken_over.is_set():
            raise RunTakenOver(f"run {self.run_id} is held by another worker now")

    def report(self, fraction: float | None = None, point: dict[str, Any] | None = None, *, force: bool = False) -> None:
        """Progress (0..1) and a metrics point; written at most every `report_every_s` unless forced. Every call
        reads whether the run is still this worker's (one indexed query a step), so a cancel stops it at the
        next step rather than at the next heartbeat."""
        if point is not None:
            self.metrics.append(_finite(point))
        now = time.monotonic()
        held = TrainingRun.objects.filter(pk=self.run_id, status=RunStatus.RUNNING, worker=WORKER_ID)
        if force or now - self._last_write >= self.report_every_s:
            self._last_write = now
            fields: dict[str, Any] = {"metrics": self.metrics, "heartbeat_at": timezone.now()}
            if fraction is not None:
                fields["progress"] = min(1.0, max(0.0, fraction))
            still_held = held.update(**fields) > 0
        else:
            still_held = held.exists()
        if not still_held:
            self.beat()  # says why: cancelled or taken over
        self.check()


def _finite(value: Any) -> Any:
    """JSON that PostgreSQL takes: a NaN or an infinity (a diverged loss) becomes None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def run_succeeded(run_id: int, control: RunControl | None = None, **fields: Any) -> bool:
    """Mark the run succeeded if this worker still holds it (not cancelled, not taken over); whether it did."""
    values = {"status": RunStatus.SUCCEEDED, "progress": 1.0, "finished_at": timezone.now(), "error": "", **fields}
    if control is not None:
        values["metrics"] = control.metrics
    return bool(TrainingRun.objects.filter(pk=run_id, status=RunStatus.RUNNING, worker=WORKER_ID).update(**values))


def run_failed(run_id: int, exc: BaseException) -> None:
    TrainingRun.objects.filter(pk=run_id, status=RunStatus.RUNNING, worker=WORKER_ID).update(
        status=RunStatus.FAILED, error=f"{type(exc).__name__}: {exc}"[:10000], finished_at=timezone.now()
    )


def run_stopped_by_cancel(run_id: int, control: RunControl) -> None:
    """The worker stopped a cancelled run: when, and the metrics up to the step it stopped at."""
    TrainingRun.objects.filter(pk=run_id, status=RunStatus.CANCELLED, finished_at__isnull=True).update(
        finished_at=timezone.now(), metrics=control.metrics
    )
