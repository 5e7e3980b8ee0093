from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from annotation.models import Annotation, Assignment, Batch, ComparisonTask, TaskSlot
from annotation.services import assignment as assignment_service
from annotation.services.assignment import annotation_submit, assignment_claim_next, assignment_give_back
from annotation.services.batches import batch_close
from annotation.services.errors import BatchClosed, LeaseExpired

from .factories import BatchFactory, annotator, make_tasks

pytestmark = pytest.mark.django_db


def submit(user, assignment, **kw):
    kw.setdefault("choice", "a")
    kw.setdefault("strength", "better")
    kw.setdefault("time_on_task_ms", 20_000)
    return annotation_submit(user=user, task_id=assignment.task_id, **kw)


def test_claim_returns_held_lease_until_submitted():
    make_tasks(BatchFactory(), 2)
    user = annotator()
    first = assignment_claim_next(user=user)
    assert assignment_claim_next(user=user).pk == first.pk
    submit(user, first)
    assert assignment_claim_next(user=user).task_id != first.task_id


def test_claim_respects_skills():
    batch = BatchFactory()
    make_tasks(batch, 1, domain="safety")
    helpful_only = annotator(safety=False)
    assert assignment_claim_next(user=helpful_only) is None
    safety = annotator(safety=True, helpful=False)
    assert assignment_claim_next(user=safety).task.domain == "safety"


def test_never_served_twice_and_overlap_filled_by_distinct_annotators():
    batch = BatchFactory(overlap=3)
    (task,) = make_tasks(batch, 1)
    users = [annotator() for _ in range(4)]
    for user in users[:3]:
        a = assignment_claim_next(user=user)
        assert a.task_id == task.id
        submit(user, a)
        assert assignment_claim_next(user=user) is None  # never the same task again
    assert assignment_claim_next(user=users[3]) is None  # overlap reached
    task.refresh_from_db()
    assert (task.annotation_count, task.status) == (3, "complete")
    assert Annotation.objects.filter(task=task).values("annotator").distinct().count() == 3


def test_older_batches_first():
    old, new = BatchFactory(name="old"), BatchFactory(name="new")
    make_tasks(new, 1)
    make_tasks(old, 1)
    assert assignment_claim_next(user=annotator()).task.batch == old


def test_expired_lease_goes_back_to_the_pool_and_old_holder_cannot_submit():
    (task,) = make_tasks(BatchFactory(lease_seconds=60), 1)
    slow, fast = annotator(), annotator()
    lease = assignment_claim_next(user=slow)
    later = timezone.now() + timedelta(seconds=61)
    taken = assignment_claim_next(user=fast, now=later)
    assert taken.task_id == task.id
    with pytest.raises(LeaseExpired):
        submit(slow, lease, now=later)
    submit(fast, taken, now=later + timedelta(seconds=10))
    assert Annotation.objects.get(task=task).annotator == fast


def test_expired_lease_is_honoured_while_nobody_took_the_slot():
    make_tasks(BatchFactory(lease_seconds=60), 1)
    user = annotator()
    lease = assignment_claim_next(user=user)
    result = submit(user, lease, now=timezone.now() + timedelta(seconds=300))
    assert result.created


def test_time_on_task_is_recorded_up_to_a_day_after_a_lease_longer_than_the_column_holds():
    make_tasks(BatchFactory(lease_seconds=40 * 86_400), 1)
    user = annotator()
    lease = assignment_claim_next(user=user)
    result = submit(user, lease, time_on_task_ms=None, now=timezone.now() + timedelta(days=30))
    result.annotation.refresh_from_db()
    assert result.annotation.time_on_task_ms == 86_400_000


def test_skip_returns_slot_and_is_never_served_again():
    (task,) = make_tasks(BatchFactory(), 1)
    user, other = annotator(), annotator()
    lease = assignment_claim_next(user=user)
    assignment_give_back(user=user, task_id=lease.task_id, skip=True)
    assert assignment_claim_next(user=user) is None
    assert assignment_claim_next(user=other).task_id == task.id


def test_a_released_task_comes_back_to_its_annotator_after_the_new_ones_and_a_skipped_one_never():
    first, second, third = make_tasks(BatchFactory(overlap=2), 3)
    user = annotator()
    released = assignment_claim_next(user=user)
    assert released.task_id == first.id
    assignment_give_back(user=user, task_id=first.id, skip=False)
    skipped = assignment_claim_next(user=user)
    assignment_give_back(user=user, task_id=skipped.task_id, skip=True)
    assert skipped.task_id == second.id
    # Not at once: what the annotator has not seen yet comes first.
    submit(user, assignment_claim_next(user=user))
    again = assignment_claim_next(user=user)
    assert again.task_id == first.id  # released: back later
    assert again.status == "leased"
    assert again.expires_at > timezone.now()
    assert Assignment.objects.filter(task=first, annotator=user).count() == 1  # the same row, leased again
    submit(user, again)
    assert Annotation.objects.filter(task=first, annotator=user).exists()
    assert assignment_claim_next(user=user) is None  # skipped: never again
    assert TaskSlot.objects.filter(task=first, state="filled").count() == 1


def test_gold_tasks_are_mixed_in_at_the_batch_rate():
    batch = BatchFactory(gold_rate=0.3)
    make_tasks(batch, 200)
    make_tasks(batch, 40, gold=True)
    assignment_service.gold_rng.seed(1234)
    user = annotator()
    served_gold = 0
    for _ in range(100):
        a = assignment_claim_next(user=user)
        served_gold += a.task.is_gold
        submit(user, a)
    # Binomial(100, 0.3): mean 30, sd ~4.6; the seed makes it reproducible.
    assert 18 <= served_gold <= 42
    gold_tasks = ComparisonTask.objects.filter(is_gold=True, assignments__annotator=user)
    assert gold_tasks.count() == served_gold  # each gold task at most once per annotator


def test_database_refuses_more_annotations_than_the_overlap():
    (task,) = make_tasks(BatchFactory(overlap=1), 1)
    with pytest.raises(IntegrityError), transaction.atomic():
        ComparisonTask.objects.filter(pk=task.pk).update(annotation_count=2)


def test_database_refuses_a_second_lease_for_one_annotator():
    t1, t2 = make_tasks(BatchFactory(), 2)
    user = annotator()
    now = timezone.now()
    Assignment.objects.create(task=t1, annotator=user, leased_at=now, expires_at=now + timedelta(minutes=5))
    with pytest.raises(IntegrityError), transaction.atomic():
        Assignment.objects.create(
            task=t2, annotator=user, leased_at=now, expires_at=now + timedelta(minutes=5)
        )


def test_slots_match_overlap():
    tasks = make_tasks(BatchFactory(overlap=3), 5)
    assert TaskSlot.objects.filter(task__in=tasks).count() == 15


def submit_scenario(tag: str) -> list:
    """Two annotators fill a task's overlap of 2, a third takes a gold task and another task half-way:
    every branch of the submit's writes (completion, a task left open, gold without a slot)."""
    batch = BatchFactory(name=f"scenario-{tag}", overlap=2, gold_rate=1.0)
    make_tasks(batch, 2)
    make_tasks(batch, 1, gold=True)
    assignment_service.gold_rng.seed(7)
    users = [annotator(f"{tag}-{i}") for i in range(3)]
    gold = assignment_claim_next(user=users[2])  # gold_rate 1: the gold task first
    assert gold.task.is_gold
    submit(users[2], gold, choice="b", strength="negligibly_better", note="gold")
    batch.gold_rate = 0.0
    batch.save(update_fields=["gold_rate"])
    for user in users[:2]:
        submit(user, assignment_claim_next(user=user), time_on_task_ms=900)
    submit(users[2], assignment_claim_next(user=users[2]), choice="b", strength="significantly_better")
    tasks = ComparisonTask.objects.filter(batch=batch)
    annotations = Annotation.objects.filter(task__batch=batch).values_list(
        "task__content_key", "annotator__username", "choice", "strength", "safety_label", "note", "time_on_task_ms",
        "too_fast")
    assignments = Assignment.objects.filter(task__batch=batch).values_list(
        "task__content_key", "annotator__username", "status", "finished_at")
    slots = TaskSlot.objects.filter(task__batch=batch).values_list(
        "task__content_key", "index", "state", "lease_expires_at", "assignment__annotator__username")
    Batch.objects.filter(pk=batch.pk).update(status="closed", closed_at=timezone.now())  # the next scenario's claims come from its own batch
    return [
        sorted(annotations),
        sorted((key, who, status, finished is not None) for key, who, status, finished in assignments),
        sorted((key, index, state, expires is None, who or "") for key, index, state, expires, who in slots),
        sorted(tasks.values_list("content_key", "annotation_count", "status")),
    ]


def test_the_single_statement_submit_writes_what_the_portable_path_writes(monkeypatch):
    """On PostgreSQL the submit writes through one hand-written statement; SQLite through the ORM. Both, on the
    same database, must leave the same rows (CI runs PostgreSQL only, so this is where the two meet)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("the single-statement path is PostgreSQL's; SQLite runs the portable one everywhere")
    single_statement = submit_scenario("cte")
    monkeypatch.setattr(assignment_service, "_submission_record_postgresql",
                        assignment_service._submission_record_portable)
    portable = submit_scenario("orm")
    strip = [[tuple(x.replace("orm-", "cte-") if isinstance(x, str) else x for x in row) for row in rows]
             for rows in portable]
    assert strip == single_statement
    assert {status for _, _, status in single_statement[3]} == {"complete", "open"}


def test_closing_a_batch_ends_its_leases_and_skipping_one_afterwards_says_the_batch_closed():
    batch = BatchFactory()
    make_tasks(batch, 2)
    user = annotator()
    lease = assignment_claim_next(user=user)
    batch_close(batch_id=batch.pk)
    assert Assignment.objects.get(pk=lease.pk).status == "expired"
    with pytest.raises(BatchClosed, match="is closed"):
        assignment_give_back(user=user, task_id=lease.task_id, skip=True)
    with pytest.raises(BatchClosed, match="is closed"):
        submit(user, lease)
    assert assignment_claim_next(user=user) is None
