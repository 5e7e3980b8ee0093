"""The annotation workflow: claim the next task under a lease, submit, skip or release it.

Safe under concurrency on PostgreSQL: a claim serialises on the annotator's profile row (so one
annotator never races with themself) and takes a task slot with SELECT ... FOR UPDATE SKIP LOCKED
(so annotators never wait for each other). Overlap is exact because a task has exactly
`required_annotations` slot rows, and the database refuses more annotations than that.
"""

import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import connection, transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from annotation.models import (
    Adjudication,
    Annotation,
    AnnotatorProfile,
    Assignment,
    AssignmentStatus,
    Batch,
    BatchStatus,
    ComparisonTask,
    Domain,
    TaskSlot,
    TaskStatus,
)
from annotation.models.tasks import SlotState
from annotation.scales import MAX_TIME_ON_TASK_MS, Choice, SafetyLabel, Strength
from annotation.validation import MAX_MESSAGE_CHARS, MAX_NOTE_CHARS, check_text, check_time_on_task_ms

from .errors import BatchClosed, Conflict, InvalidInput, LeaseExpired, NotFound

logger = logging.getLogger(__name__)

# Module-level so tests can seed it; decides when a gold task is mixed in.
gold_rng = random.Random()

# The claim and submit hot paths read with hand-written SQL: the ORM's query compilation cost more than
# the queries themselves. Writes and rare paths stay on the ORM. Row locks are spelled per backend.
_T = {
    m.__name__: m._meta.db_table
    for m in (Annotation, AnnotatorProfile, Assignment, Batch, ComparisonTask, TaskSlot)
}


def _for_update(*, skip_locked: bool = False, of: str = "", no_key: bool = False) -> str:
    features = connection.features
    if not features.has_select_for_update:
        return ""  # SQLite: the IMMEDIATE transaction already serialises writers
    clause = " FOR NO KEY UPDATE" if no_key and connection.vendor == "postgresql" else " FOR UPDATE"
    if of and features.has_select_for_update_of:
        clause += f" OF {of}"
    if skip_locked and features.has_select_for_update_skip_locked:
        clause += " SKIP LOCKED"
    return clause


def _fetchone(sql: str, params: list) -> tuple | None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def _aware(value) -> datetime:
    """Datetimes read with raw SQL: SQLite returns text."""
    if isinstance(value, str):
        value = parse_datetime(value)
    return value if timezone.is_aware(value) else timezone.make_aware(value, UTC)


def _domains_for_update(user) -> list[str]:
    """Lock the annotator's profile row and return their domains.

    Serialises this annotator's own claims; other annotators are not blocked.
    """
    sql = f"SELECT skill_helpfulness, skill_safety FROM {_T['AnnotatorProfile']} WHERE user_id = %s" + _for_update()
    row = _fetchone(sql, [user.pk])
    if row is None:
        AnnotatorProfile.objects.get_or_create(user=user)
        row = _fetchone(sql, [user.pk])
    return [d for d, ok in zip(("helpfulness", "safety"), row, strict=True) if ok]


def _expire(assignment: Assignment, now: datetime) -> None:
    """Mark a lease that ran out; free its slot if nobody has taken it over yet."""
    assignment.status = AssignmentStatus.EXPIRED
    assignment.finished_at = now
    assignment.save(update_fields=["status", "finished_at"])
    TaskSlot.objects.filter(assignment=assignment, state=SlotState.LEASED).update(
        state=SlotState.FREE, assignment=None, lease_expires_at=None
    )


@dataclass(frozen=True)
class _Slot:
    id: int
    task_id: int
    state: str
    assignment_id: int | None
    batch_id: int
    lease_seconds: int
    gold_rate: float
    released: bool  # a task this annotator released earlier, served to them again


def _next_slot(
    user, domains: list[str], now: datetime, passed_over: list[int] = (), *, released: bool = False
) -> _Slot | None:
    """Lock the first claimable slot: oldest batch first, then oldest task; skip rows others hold and the
    slots `passed_over`. Tasks this annotator was never served, or with `released`, the ones they released.

    One index range scan per (batch, domain) on the partial index of unfilled slots, in task order, so a
    claim costs the same with 2,000 or 200,000 tasks in the pool.
    """
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT id, lease_seconds, gold_rate FROM {_T['Batch']} WHERE status = 'open' ORDER BY id")
        batches = cursor.fetchall()
    sql = (
        f"SELECT s.id, s.task_id, s.state, s.assignment_id FROM {_T['TaskSlot']} s"
        " WHERE s.batch_id = %s AND s.domain = %s"
        " AND (s.state = 'free' OR (s.state = 'leased' AND s.lease_expires_at < %s))"
        + (" AND EXISTS" if released else " AND NOT EXISTS")
        + f" (SELECT 1 FROM {_T['Assignment']} x WHERE x.task_id = s.task_id AND x.annotator_id = %s"
        + (" AND x.status = 'released')" if released else ")")
        + (f" AND s.id NOT IN ({', '.join(['%s'] * len(passed_over))})" if passed_over else "")
        + " ORDER BY s.task_id, s.\"index\" LIMIT 1" + _for_update(skip_locked=True)
    )
    stamp = connection.ops.adapt_datetimefield_value(now)
    for batch_id, lease_seconds, gold_rate in batches:
        for domain in domains:
            row = _fetchone(sql, [batch_id, domain, stamp, user.pk, *passed_over])
            if row is not None:
                return _Slot(*row, batch_id=batch_id, lease_seconds=lease_seconds, gold_rate=gold_rate,
                             released=released)  # fmt: skip
    return None


def _claimable_slot(user, domains: list[str], now: datetime, *, released: bool) -> _Slot | None:
    """`_next_slot`, passing over expired leases whose holder is acting on them right now."""
    passed_over: list[int] = []
    slot = _next_slot(user, domains, now, released=released)
    while slot is not None and slot.state == SlotState.LEASED and not _lock_for_take_over(slot.assignment_id):
        passed_over.append(slot.id)
        slot = _next_slot(user, domains, now, passed_over, released=released)
    return slot


def _next_gold_task(user, domains: list[str], batch_id: int) -> ComparisonTask | None:
    return (
        ComparisonTask.objects.filter(
            is_gold=True, batch_id=batch_id, domain__in=domains, status=TaskStatus.OPEN
        )
        .exclude(assignments__annotator=user)
        .order_by("id")
        .first()
    )


def _lock_for_take_over(assignment_id: int) -> bool:
    """Lock the assignment of an expired lease whose slot this claim holds, unless someone holds it already.

    The holder's own paths (a late submit, a skip, an expiry) lock the assignment first and its slot second;
    a claim holds the slot already, so waiting here for the assignment would deadlock with them. A held
    assignment means its holder is acting on it now: the claim passes this slot over.
    """
    return _fetchone(f"SELECT id FROM {_T['Assignment']} WHERE id = %s" + _for_update(skip_locked=True),
                     [assignment_id]) is not None


@transaction.atomic
def assignment_claim_next(*, user, now: datetime | None = None) -> Assignment | None:
    """Lease the next task for this annotator, or return the lease they already hold; None if no work."""
    now = now or timezone.now()
    domains = _domains_for_update(user)
    held = _fetchone(
        f"SELECT a.id, a.task_id, a.leased_at, a.expires_at, b.status FROM {_T['Assignment']} a"
        f" JOIN {_T['ComparisonTask']} t ON t.id = a.task_id JOIN {_T['Batch']} b ON b.id = t.batch_id"
        " WHERE a.annotator_id = %s AND a.status = 'leased'",
        [user.pk],
    )
    if held is not None:
        assignment = Assignment(
            id=held[0], task_id=held[1], annotator=user, status=AssignmentStatus.LEASED,
            leased_at=_aware(held[2]), expires_at=_aware(held[3]),
        )  # fmt: skip
        if assignment.expires_at > now and held[4] == BatchStatus.OPEN:
            return assignment
        _expire(assignment, now)  # ran out, or its batch was closed meanwhile

    if not domains:
        return None
    # Released tasks ("not now") come back to the annotator once nothing new is left for them; skipped
    # ones ("never again") do not.
    slot = _claimable_slot(user, domains, now, released=False) or _claimable_slot(user, domains, now, released=True)
    if slot is None:
        return None
    expires_at = now + timedelta(seconds=slot.lease_seconds)

    if slot.gold_rate > 0 and gold_rng.random() < slot.gold_rate:
        gold = _next_gold_task(user, domains, slot.batch_id)
        if gold is not None:
            # The slot lock is simply dropped at commit: it stays free for the next claim.
            return Assignment.objects.create(task=gold, annotator=user, leased_at=now, expires_at=expires_at)

    if slot.state == SlotState.LEASED:
        # Taking over a slot whose lease ran out (its assignment locked above): the old holder can no longer
        # submit it.
        Assignment.objects.filter(pk=slot.assignment_id).update(status=AssignmentStatus.EXPIRED, finished_at=now)
    if slot.released:
        # One assignment row per task and annotator (a constraint): the released one is leased again.
        assignment = Assignment.objects.get(task_id=slot.task_id, annotator=user, status=AssignmentStatus.RELEASED)
        assignment.status, assignment.leased_at, assignment.expires_at = AssignmentStatus.LEASED, now, expires_at
        assignment.finished_at = None
        assignment.save(update_fields=["status", "leased_at", "expires_at", "finished_at"])
    else:
        assignment = Assignment.objects.create(
            task_id=slot.task_id, annotator=user, leased_at=now, expires_at=expires_at
        )
    TaskSlot.objects.filter(pk=slot.id).update(
        state=SlotState.LEASED, assignment=assignment, lease_expires_at=expires_at
    )
    return assignment


@dataclass(frozen=True)
class SubmitResult:
    annotation: Annotation
    created: bool  # False when this was a repeated submit of the same task
    continuation: ComparisonTask | None = None


def _validate_labels(domain: str, choice, strength, safety_label) -> tuple[str, str, str]:
    if choice not in {c.value for c in Choice}:
        raise InvalidInput(f"choice must be one of {[c.value for c in Choice]}, got {choice!r}", field="choice")
    if strength not in {s.value for s in Strength}:
        raise InvalidInput(
            f"strength must be one of {[s.value for s in Strength]}, got {strength!r}", field="strength"
        )
    safety_label = safety_label or ""
    if safety_label and safety_label not in {s.value for s in SafetyLabel}:
        raise InvalidInput(
            f"safety_label must be one of {[s.value for s in SafetyLabel]}, got {safety_label!r}",
            field="safety_label",
        )
    if domain == Domain.SAFETY and not safety_label:
        raise InvalidInput("safety tasks need a safety_label", field="safety_label")
    if domain != Domain.SAFETY and safety_label:
        raise InvalidInput(
            f"safety_label is for safety tasks; this is a {domain} task, so leave it out", field="safety_label"
        )
    return choice, strength, safety_label


@transaction.atomic
def annotation_submit(
    *,
    user,
    task_id: int,
    choice: str,
    strength: str,
    safety_label: str = "",
    note: str = "",
    time_on_task_ms: int | None = None,
    continue_with: str = "",
    now: datetime | None = None,
) -> SubmitResult:
    """Record a judgement for a task this annotator holds; a repeated submit returns the first one."""
    now = now or timezone.now()
    held = _fetchone(
        f"SELECT a.id, a.status, a.leased_at, t.is_gold, t.domain, b.status, b.name, b.too_fast_seconds"
        f" FROM {_T['Assignment']} a JOIN {_T['ComparisonTask']} t ON t.id = a.task_id"
        f" JOIN {_T['Batch']} b ON b.id = t.batch_id"
        " WHERE a.task_id = %s AND a.annotator_id = %s" + _for_update(of="a"),
        [task_id, user.pk],
    )
    if held is None:
        raise NotFound(f"task {task_id} is not assigned to you; claim it with POST /api/v1/tasks/next/")
    assignment_id, status, leased_at, is_gold, domain, batch_status, batch_name, too_fast_seconds = held
    if status == AssignmentStatus.SUBMITTED:
        return SubmitResult(annotation=Annotation.objects.get(assignment_id=assignment_id), created=False)
    if status in (AssignmentStatus.SKIPPED, AssignmentStatus.RELEASED):
        raise Conflict(f"task {task_id} was {status} and can no longer be submitted")
    if status == AssignmentStatus.EXPIRED:
        # Expired by its time running out, or by the batch's close: the status read with the lock above can
        # predate a close this submit waited for, so read it again.
        _refuse_if_batch_closed(task_id)
        raise LeaseExpired(f"your lease on task {task_id} expired and the task went back to the pool")

    # Lock order everywhere: slot, then task. The task lock is NO KEY UPDATE so that concurrent claims,
    # whose inserts take FOR KEY SHARE on the task through the foreign key, are not blocked by it.
    # A lease past its expiry is still honoured while nobody has taken the slot over.
    slot = None
    if not is_gold:
        slot = _fetchone(f"SELECT id, state FROM {_T['TaskSlot']} WHERE assignment_id = %s" + _for_update(), [assignment_id])
        if slot is None or slot[1] != SlotState.LEASED:
            raise LeaseExpired(f"your lease on task {task_id} expired and the task went back to the pool")
    _fetchone(f"SELECT id FROM {_T['ComparisonTask']} WHERE id = %s" + _for_update(no_key=True), [task_id])
    if batch_status != BatchStatus.OPEN:
        raise BatchClosed(f"batch {batch_name!r} is closed; this task can no longer be annotated")
    choice, strength, safety_label = _validate_labels(domain, choice, strength, safety_label)
    time_on_task_ms = check_time_on_task_ms(time_on_task_ms)
    note = check_text(note, field="note", max_length=MAX_NOTE_CHARS)
    continue_with = check_text(continue_with, field="continue_with", max_length=MAX_MESSAGE_CHARS)
    served_ms = min(int((now - _aware(leased_at)).total_seconds() * 1000), MAX_TIME_ON_TASK_MS)
    elapsed_ms = time_on_task_ms if time_on_task_ms is not None else served_ms
    # Flag on the shorter of what the client reports and what the server saw.
    too_fast = min(elapsed_ms, served_ms) < too_fast_seconds * 1000

    fields = dict(task_id=task_id, annotator=user, assignment_id=assignment_id, choice=choice, strength=strength,
                  safety_label=safety_label, note=note, time_on_task_ms=elapsed_ms, too_fast=too_fast)  # fmt: skip
    record = _submission_record_postgresql if connection.vendor == "postgresql" else _submission_record_portable
    annotation = record(fields, slot_id=slot[0] if slot else None, now=now)

    continuation = None
    if continue_with.strip():
        from .dialogues import dialogue_continue

        continuation = dialogue_continue(annotation=annotation, user_text=continue_with)
    return SubmitResult(annotation=annotation, created=True, continuation=continuation)


def _refuse_if_batch_closed(task_id: int) -> None:
    """BatchClosed if the task's batch is closed, read afresh (not from a snapshot that predates the close)."""
    status, name = _fetchone(f"SELECT b.status, b.name FROM {_T['Batch']} b JOIN {_T['ComparisonTask']} t"
                             " ON t.batch_id = b.id WHERE t.id = %s", [task_id])
    if status != BatchStatus.OPEN:
        raise BatchClosed(f"batch {name!r} is closed; this task can no longer be annotated")


def _submission_record_portable(fields: dict, *, slot_id: int | None, now: datetime) -> Annotation:
    """The four writes of a submit through the ORM (SQLite): the annotation, the assignment submitted, the slot
    filled, the task's count (and completion when its overlap is reached, in the same statement)."""
    annotation = Annotation.objects.create(**fields)
    Assignment.objects.filter(pk=fields["assignment_id"]).update(status=AssignmentStatus.SUBMITTED, finished_at=now)
    if slot_id is not None:
        TaskSlot.objects.filter(pk=slot_id).update(state=SlotState.FILLED, lease_expires_at=None)
    ComparisonTask.objects.filter(pk=fields["task_id"]).update(
        annotation_count=F("annotation_count") + 1,
        status=Case(
            When(Q(is_gold=False, annotation_count__gte=F("required_annotations") - 1), then=Value(TaskStatus.COMPLETE)),
            default=F("status"),
        ),
    )
    return annotation


def _submission_record_postgresql(fields: dict, *, slot_id: int | None, now: datetime) -> Annotation:
    """The four writes of a submit in one round trip (PostgreSQL's data-modifying CTEs), the same as
    `_submission_record_portable` (a test holds the two to the same rows)."""
    created_at = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            f"""WITH ins AS (
                  INSERT INTO {_T['Annotation']} (task_id, annotator_id, assignment_id, choice, strength, safety_label,
                                                 note, time_on_task_ms, too_fast, created_at)
                  VALUES (%(task)s, %(annotator)s, %(assignment)s, %(choice)s, %(strength)s, %(safety)s, %(note)s,
                          %(ms)s, %(too_fast)s, %(created_at)s) RETURNING id),
                asg AS (UPDATE {_T['Assignment']} SET status = %(submitted)s, finished_at = %(now)s WHERE id = %(assignment)s),
                slot AS (UPDATE {_T['TaskSlot']} SET state = %(filled)s, lease_expires_at = NULL WHERE id = %(slot)s),
                task AS (UPDATE {_T['ComparisonTask']} SET annotation_count = annotation_count + 1,
                           status = CASE WHEN NOT is_gold AND annotation_count >= required_annotations - 1
                                         THEN %(complete)s ELSE status END
                         WHERE id = %(task)s)
                SELECT id FROM ins""",
            {"task": fields["task_id"], "annotator": fields["annotator"].pk, "assignment": fields["assignment_id"],
             "choice": fields["choice"], "strength": fields["strength"], "safety": fields["safety_label"],
             "note": fields["note"], "ms": fields["time_on_task_ms"], "too_fast": fields["too_fast"],
             "created_at": created_at, "submitted": AssignmentStatus.SUBMITTED.value, "now": now,
             "filled": SlotState.FILLED.value, "slot": slot_id, "complete": TaskStatus.COMPLETE.value},
        )  # fmt: skip
        (annotation_id,) = cursor.fetchone()
    annotation = Annotation(id=annotation_id, created_at=created_at, **fields)
    annotation._state.adding, annotation._state.db = False, connection.alias
    return annotation


@transaction.atomic
def assignment_give_back(*, user, task_id: int, skip: bool, now: datetime | None = None) -> Assignment:
    """Skip (never serve again) or release (give back for now) a held task; its slot returns to the pool."""
    now = now or timezone.now()
    assignment = Assignment.objects.select_for_update().filter(task_id=task_id, annotator=user).first()
    if assignment is None:
        raise NotFound(f"task {task_id} is not assigned to you")
    if assignment.status != AssignmentStatus.LEASED:
        if assignment.status == AssignmentStatus.EXPIRED:
            _refuse_if_batch_closed(task_id)  # closing a batch ends its leases
        raise Conflict(f"task {task_id} is {assignment.status}, not leased; nothing to give back")
    assignment.status = AssignmentStatus.SKIPPED if skip else AssignmentStatus.RELEASED
    assignment.finished_at = now
    assignment.save(update_fields=["status", "finished_at"])
    TaskSlot.objects.filter(assignment=assignment, state=SlotState.LEASED).update(
        state=SlotState.FREE, assignment=None, lease_expires_at=None
    )
    return assignment


@dataclass(frozen=True)
class UndoResult:
    task_id: int
    batch_name: str
    choice: str
    strength: str


@transaction.atomic
def annotation_undo_last(*, user, annotation_id: int) -> UndoResult:
    """Withdraw the annotator's most recent answer while its task is still open: the annotation and its
    assignment are deleted, the slot is freed and the task's count goes back down, in one transaction (the
    task can be served again, to them or to someone else). Refused, with the reason, for any other annotation,
    a closed batch, a complete or adjudicated task, or an answer whose next message opened a comparison.

    Lock order as in a submit: the assignment, then the slot, then the task (after the annotator's profile row,
    which serialises this annotator's own claims and undos). Each undo is logged (who, which task, what answer).
    """
    _domains_for_update(user)
    latest = Annotation.objects.filter(annotator=user).order_by("-created_at", "-id").values_list("id", flat=True).first()
    if latest is None or latest != annotation_id:
        if not Annotation.objects.filter(pk=annotation_id, annotator=user).exists():
            raise NotFound(f"annotation {annotation_id} is not one of yours")
        raise Conflict("only your most recent answer can be undone")
    annotation = Annotation.objects.select_related("task__batch").get(pk=annotation_id)
    task = annotation.task
    assignment = Assignment.objects.select_for_update().get(pk=annotation.assignment_id)
    slot = TaskSlot.objects.select_for_update().filter(assignment=assignment).first()
    task = ComparisonTask.objects.select_for_update(no_key=connection.vendor == "postgresql").get(pk=task.pk)
    batch = Batch.objects.get(pk=task.batch_id)
    if batch.status != BatchStatus.OPEN:
        raise BatchClosed(f"batch {batch.name!r} is closed; its answers are final and cannot be undone")
    if task.status != TaskStatus.OPEN:
        raise Conflict(f"task {task.pk} is {task.get_status_display().lower()}; its answers can no longer be undone")
    if Adjudication.objects.filter(task_id=task.pk).exists():
        raise Conflict(f"task {task.pk} has been adjudicated; its answers can no longer be undone")
    if opened := ComparisonTask.objects.filter(opened_by=annotation).values_list("pk", flat=True).first():
        raise Conflict(f"your next message on this answer opened comparison {opened}; it can no longer be undone")
    result = UndoResult(task_id=task.pk, batch_name=batch.name, choice=annotation.choice, strength=annotation.strength)
    annotation.delete()
    if slot is not None:
        TaskSlot.objects.filter(pk=slot.pk).update(state=SlotState.FREE, assignment=None, lease_expires_at=None)
    assignment.delete()
    ComparisonTask.objects.filter(pk=task.pk).update(annotation_count=F("annotation_count") - 1)
    logger.info("user %s undid annotation %s on task %s (%s %s, made %s)", user.pk, annotation_id, task.pk,
                result.choice, result.strength, annotation.created_at.isoformat())  # fmt: skip
    return result
