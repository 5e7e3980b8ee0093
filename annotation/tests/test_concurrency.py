"""Many annotators claim and submit at once against the real database: overlap is exact."""

import threading
from collections import Counter

import pytest
from django.db import connection, connections

from annotation.models import Annotation, ComparisonTask
from annotation.services.assignment import annotation_submit, assignment_claim_next

from .factories import BatchFactory, annotator, make_tasks

N_ANNOTATORS = 24
N_TASKS = 200
OVERLAP = 3


@pytest.mark.django_db(transaction=True)
def test_concurrent_annotators_fill_every_task_exactly_to_its_overlap():
    if connection.vendor != "postgresql":
        pytest.skip("row locks with SKIP LOCKED need PostgreSQL (CI runs this on PostgreSQL)")
    batch = BatchFactory(overlap=OVERLAP)
    make_tasks(batch, N_TASKS)
    users = [annotator(f"concurrent-{i}") for i in range(N_ANNOTATORS)]
    errors: list[BaseException] = []
    acknowledged: list[int] = []  # annotation ids the service returned as created
    lock = threading.Lock()
    start = threading.Barrier(N_ANNOTATORS)

    def work(user):
        try:
            start.wait()
            while True:
                lease = assignment_claim_next(user=user)
                if lease is None:
                    return
                result = annotation_submit(
                    user=user,
                    task_id=lease.task_id,
                    choice="a",
                    strength="slightly_better",
                    time_on_task_ms=9000,
                )
                with lock:
                    acknowledged.append(result.annotation.pk)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)

    assert not errors, errors
    assert len(acknowledged) == len(set(acknowledged)) == N_TASKS * OVERLAP
    per_task = Counter(Annotation.objects.values_list("task_id", flat=True))
    assert len(per_task) == N_TASKS
    assert set(per_task.values()) == {OVERLAP}
    pairs = set(Annotation.objects.values_list("task_id", "annotator_id"))
    assert set(Counter(task for task, _ in pairs).values()) == {OVERLAP}  # three different annotators each
    assert set(Annotation.objects.values_list("id", flat=True)) == set(acknowledged)  # none lost, none extra
    assert not ComparisonTask.objects.exclude(status="complete").exists()
    assert ComparisonTask.objects.filter(annotation_count=OVERLAP).count() == N_TASKS
    # Work was spread: with SKIP LOCKED nobody waits for the others, so every annotator got some.
    per_user = Counter(Annotation.objects.values_list("annotator_id", flat=True))
    assert len(per_user) == N_ANNOTATORS
