"""Batches: open, close (which fixes the held-out test split)."""

import random

from django.db import transaction
from django.utils import timezone

from annotation.models import Batch, BatchStatus, ComparisonTask, Split

from .errors import Conflict


@transaction.atomic
def batch_close(*, batch_id: int) -> Batch:
    """Freeze a batch: no more claims or submits, and `test_size` of its tasks become the test split.

    The split is drawn with a seed derived from the batch, so it is fixed and reproducible; gold tasks
    belong to neither split.
    """
    batch = Batch.objects.select_for_update().get(pk=batch_id)
    if batch.status == BatchStatus.CLOSED:
        raise Conflict(f"batch {batch.name!r} is already closed")
    task_ids = list(
        ComparisonTask.objects.filter(batch=batch, is_gold=False).order_by("id").values_list("id", flat=True)
    )
    test_ids = set(random.Random(f"split:{batch.pk}:{batch.name}").sample(task_ids, min(batch.test_size, len(task_ids))))
    ComparisonTask.objects.filter(pk__in=test_ids).update(split=Split.TEST)
    ComparisonTask.objects.filter(batch=batch, is_gold=False).exclude(pk__in=test_ids).update(split=Split.TRAIN)
    batch.status = BatchStatus.CLOSED
    batch.closed_at = timezone.now()
    batch.save(update_fields=["status", "closed_at"])
    return batch
