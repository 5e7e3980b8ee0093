"""Concurrency against the real database: many annotators at once, a submit racing a batch's close."""

import threading
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection, connections, transaction
from django.utils import timezone

from annotation.models import Annotation, Assignment, Batch, ComparisonTask, TaskSlot
from annotation.services.assignment import annotation_submit, assignment_claim_next
from annotation.services.batches import batch_close
from annotation.services.errors import BatchClosed

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


def in_thread(work, *, hold: threading.Event | None = None, done: threading.Event | None = None):
    """Run work() in its own transaction on its own connection; with `hold`, keep the transaction open (its row
    locks held) after setting `done`, until `hold` is set. Returns the thread and a dict with its result or error."""
    outcome: dict = {}

    def run():
        try:
            with transaction.atomic():
                outcome["result"] = work()
                if done is not None:
                    done.set()
                if hold is not None:
                    hold.wait(30)
        except BaseException as exc:  # surfaced by the test
            outcome["error"] = exc
        finally:
            if done is not None:
                done.set()
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def leased_task():
    batch = BatchFactory()
    make_tasks(batch, 3)
    user = annotator("racer")
    lease = assignment_claim_next(user=user)
    return batch, user, lease


def submit(user, lease, **kw):
    return annotation_submit(user=user, task_id=lease.task_id, choice="a", strength="better", time_on_task_ms=9000,
                             **kw)


@pytest.mark.django_db(transaction=True)
def test_a_submit_that_comes_while_the_batch_closes_is_refused_and_stores_nothing():
    if connection.vendor != "postgresql":
        pytest.skip("the race needs concurrent transactions (CI runs this on PostgreSQL)")
    batch, user, lease = leased_task()
    hold, closed = threading.Event(), threading.Event()
    closer, closing = in_thread(lambda: batch_close(batch_id=batch.pk), hold=hold, done=closed)
    assert closed.wait(30)
    assert "error" not in closing
    # The close has not committed: the batch still reads as open, and the submit waits for the lease it holds.
    submitter, submitting = in_thread(lambda: submit(user, lease))
    submitter.join(0.5)
    assert submitter.is_alive()
    hold.set()
    closer.join(30)
    submitter.join(30)
    assert isinstance(submitting.get("error"), BatchClosed), submitting
    assert not Annotation.objects.exists()
    assert Assignment.objects.get(pk=lease.pk).status == "expired"
    assert ComparisonTask.objects.get(pk=lease.task_id).annotation_count == 0


@pytest.mark.django_db(transaction=True)
def test_a_submit_under_way_when_the_batch_closes_is_kept_and_the_close_waits_for_it():
    """The close's expiry of leased assignments must test the status on the row the submit committed (not on a
    subquery read before the wait), or it would expire the lease just submitted."""
    if connection.vendor != "postgresql":
        pytest.skip("the race needs concurrent transactions (CI runs this on PostgreSQL)")
    batch, user, lease = leased_task()
    hold, submitted = threading.Event(), threading.Event()
    submitter, submitting = in_thread(lambda: submit(user, lease), hold=hold, done=submitted)
    assert submitted.wait(30)
    assert "error" not in submitting
    closer, closing = in_thread(lambda: batch_close(batch_id=batch.pk))
    closer.join(0.5)
    assert closer.is_alive()  # it waits for the submit's lock on the lease
    hold.set()
    submitter.join(30)
    closer.join(30)
    assert "error" not in closing, closing
    annotation = Annotation.objects.get()
    assert annotation.pk == submitting["result"].annotation.pk
    assert Assignment.objects.get(pk=lease.pk).status == "submitted"
    assert ComparisonTask.objects.get(pk=lease.task_id).annotation_count == 1
    closed = Batch.objects.get(pk=batch.pk)
    assert closed.status == "closed"
    assert annotation.created_at <= closed.closed_at


@pytest.mark.django_db(transaction=True)
def test_a_submit_that_continues_the_dialogue_while_the_batch_closes_does_not_deadlock(monkeypatch):
    """The continuation's new task refers to the batch (KEY SHARE on its row) while the close waits for the
    submit's lease: the close must hold the batch with a lock that lets that through."""
    if connection.vendor != "postgresql":
        pytest.skip("the race needs concurrent transactions (CI runs this on PostgreSQL)")
    from annotation.services import dialogues

    batch, user, lease = leased_task()
    original = dialogues.dialogue_continue
    locked, go_on = threading.Event(), threading.Event()

    def paused(**kwargs):
        locked.set()  # the submit holds its lease here, its continuation still to write
        go_on.wait(30)
        return original(**kwargs)

    monkeypatch.setattr(dialogues, "dialogue_continue", paused)
    submitter, submitting = in_thread(lambda: submit(user, lease, continue_with="And then?"))
    assert locked.wait(30)
    closer, closing = in_thread(lambda: batch_close(batch_id=batch.pk))
    closer.join(0.5)
    assert closer.is_alive()  # it waits for the lease the submit holds
    go_on.set()
    submitter.join(30)
    closer.join(30)
    assert "error" not in submitting, submitting
    assert "error" not in closing, closing
    assert submitting["result"].continuation.batch_id == batch.pk
    assert Batch.objects.get(pk=batch.pk).status == "closed"
    assert ComparisonTask.objects.filter(batch=batch, status="awaiting_responses").count() == 1


def expired_lease(lease):
    """Run the lease out in the database: its slot becomes claimable by others."""
    leased_at = timezone.now() - timedelta(hours=1)
    past = leased_at + timedelta(minutes=15)
    Assignment.objects.filter(pk=lease.pk).update(leased_at=leased_at, expires_at=past)
    TaskSlot.objects.filter(assignment_id=lease.pk).update(lease_expires_at=past)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("holder_action", ["claims again", "submits late"])
def test_a_claim_taking_over_an_expired_lease_passes_it_over_while_its_holder_acts_on_it(monkeypatch, holder_action):
    """The claim holds the slot and wants the old assignment; the holder (claiming again, or submitting late)
    holds the assignment and wants the slot. The claim must not wait (the two would deadlock): it passes the
    slot over, and the holder's action goes through."""
    if connection.vendor != "postgresql":
        pytest.skip("the race needs concurrent transactions (CI runs this on PostgreSQL)")
    from annotation.services import assignment as service

    batch = BatchFactory()
    make_tasks(batch, 1)
    holder, taker = annotator("holder"), annotator("taker")
    lease = assignment_claim_next(user=holder)
    expired_lease(lease)
    original = service._next_slot
    locked, go_on = threading.Event(), threading.Event()

    def paused(user, *args, **kwargs):
        slot = original(user, *args, **kwargs)
        if user.pk == taker.pk and not locked.is_set():
            locked.set()  # the taker holds the slot's lock, about to lock the holder's assignment
            go_on.wait(30)
        return slot

    monkeypatch.setattr(service, "_next_slot", paused)
    taking, took = in_thread(lambda: assignment_claim_next(user=taker))
    assert locked.wait(30)
    if holder_action == "claims again":
        acting, acted = in_thread(lambda: assignment_claim_next(user=holder))
    else:
        acting, acted = in_thread(lambda: submit(holder, lease))
    acting.join(1)
    assert acting.is_alive()  # the holder holds its assignment and waits for the slot
    go_on.set()
    acting.join(30)
    taking.join(30)
    assert took == {"result": None}  # the only slot was passed over, without waiting
    if holder_action == "claims again":
        assert acted == {"result": None}  # its lease ended, and it never gets the same task twice
        assert Assignment.objects.get(pk=lease.pk).status == "expired"
        assert TaskSlot.objects.get(task_id=lease.task_id).state == "free"
    else:
        assert "error" not in acted, acted  # nobody took the slot over: the late submit is honoured
        assert Annotation.objects.get().task_id == lease.task_id
        assert TaskSlot.objects.get(task_id=lease.task_id).state == "filled"
