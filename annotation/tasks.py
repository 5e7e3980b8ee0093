"""Celery tasks of the web tier: light work, ids in, files out. Idempotent, so acks_late is safe."""

from pathlib import Path

from celery import shared_task
from django.conf import settings

from annotation.models import Batch
from annotation.services.exports import ExportFilters, comparisons_export_lines
from annotation.services.runs import runs_reconcile


@shared_task(name="annotation.export_batch")
def export_batch(batch_id: int, fmt: str = "native", aggregate: bool = False) -> str:
    """Write a batch's comparisons to ARTIFACTS_DIR/exports/ atomically; returns the file's path."""
    batch = Batch.objects.get(pk=batch_id)
    out_dir = Path(settings.ARTIFACTS_DIR) / "exports"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{batch.name}.{fmt}{'.majority' if aggregate else ''}.jsonl"
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("w", encoding="utf-8") as f:
        for line in comparisons_export_lines(filters=ExportFilters(batch=batch.name), fmt=fmt, aggregate=aggregate):
            f.write(line)
    tmp.replace(out)
    return str(out)


@shared_task(name="annotation.reconcile_runs")
def reconcile_runs() -> list[int]:
    """Beat, every RUN_RECONCILE_SECONDS: re-queue runs whose worker died and resend runs whose message was lost."""
    return runs_reconcile()
