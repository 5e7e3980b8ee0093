"""Batches: open, close (which fixes the held-out test split)."""

import random

from django.db import transaction
from django.utils import timezone

from annotation.models import Assignment, AssignmentStatus, Batch, BatchStatus, ComparisonTask, Split

from .errors import Conflict


@transaction.atomic
def batch_close(*, batch_id: int) -> Batch:
    """Freeze a batch: no more claims or submits, and `test_size` of its tasks become the test split.

    Leases still held in the batch end (expired); an annotation submitted before the close commits is kept.

    The split is drawn with a seed derived from the batch, so it is fixed and reproducible; gold tasks
    belong to neither split.
    """
    # NO KEY UPDATE: enough to serialise two closes, and it lets a submit under way insert rows that refer to
    # the batch (a dialogue's continuation task takes KEY SHARE on it), which a plain FOR UPDATE would make
    # wait for this close while this close waits for that submit's lease below: a deadlock.
    batch = Batch.objects.select_for_update(no_key=True).get(pk=batch_id)
    if batch.status == BatchStatus.CLOSED:
        raise Conflict(f"batch {batch.name!r} is already closed")
    # The leases still held end here. The submit locks its assignment and reads the batch's status without
    # locking the batch (the hot path stays free of a shared row lock); updating the leased assignments
    # takes their locks, so a submit already under way commits first and is counted in the batch, and one that
    # comes after finds its lease ended and is refused. A claim that read the batch as open just before this
    # commits can still lease a task in it; its submit is refused the same way (it reads the batch's status
    # afresh), and the annotator's next claim ends that lease. The slots are left leased: freeing them here
    # would lock slots after assignments, the reverse of a claim that takes over an expired lease, and no
    # claim serves a closed batch's slots.
    now = timezone.now()
    # The status test stays in the UPDATE's own WHERE (no join, which Django would turn into `id IN (SELECT ...)`
    # read before the wait): after waiting for a submit, PostgreSQL checks it again on the row it committed.
    batch_tasks = ComparisonTask.objects.filter(batch=batch).values("id")
    Assignment.objects.filter(status=AssignmentStatus.LEASED, task_id__in=batch_tasks).update(
        status=AssignmentStatus.EXPIRED, finished_at=now
    )
    task_ids = list(
        ComparisonTask.objects.filter(batch=batch, is_gold=False).order_by("id").values_list("id", flat=True)
    )
    test_ids = set(random.Random(f"split:{batch.pk}:{batch.name}").sample(task_ids, min(batch.test_size, len(task_ids))))
    ComparisonTask.objects.filter(pk__in=test_ids).update(split=Split.TEST)
    ComparisonTask.objects.filter(batch=batch, is_gold=False).exclude(pk__in=test_ids).update(split=Split.TRAIN)
    batch.status = BatchStatus.CLOSED
    batch.closed_at = timezone.now()  # after any submit it waited for
    batch.save(update_fields=["status", "closed_at"])
    return batch
