"""The annotation workflow: claim the next task under a lease, submit, skip or release it.

Safe under concurrency on PostgreSQL: a claim serialises on the annotator's profile row (so one
annotator never races with themself) and takes a task slot with SELECT ... FOR UPDATE SKIP LOCKED
(so annotators never wait for each other). Overlap is exact because a task has exactly
`required_annotations` slot rows, and the database refuses more annotations than that.
"""

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from annotation.models import (
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
from annotation.scales import Choice, SafetyLabel, Strength

from .errors import BatchClosed, Conflict, InvalidInput, LeaseExpired, NotFound

# Module-level so tests can seed it; decides when a gold task is mixed in.
gold_rng = random.Random()


def _profile_for_update(user) -> AnnotatorProfile:
    # Serialise this annotator's own claims and submits; other annotators are not blocked.
    profile = AnnotatorProfile.objects.select_for_update().filter(user=user).first()
    if profile is None:
        AnnotatorProfile.objects.get_or_create(user=user)
        profile = AnnotatorProfile.objects.select_for_update().get(user=user)
    return profile


def _expire(assignment: Assignment, now: datetime) -> None:
    """Mark a lease that ran out; free its slot if nobody has taken it over yet."""
    assignment.status = AssignmentStatus.EXPIRED
    assignment.finished_at = now
    assignment.save(update_fields=["status", "finished_at"])
    TaskSlot.objects.filter(assignment=assignment, state=SlotState.LEASED).update(
        state=SlotState.FREE, assignment=None, lease_expires_at=None
    )


def _next_slot(user, domains: list[str], now: datetime) -> TaskSlot | None:
    """Lock the first claimable slot: oldest batch first, then oldest task; skip rows others hold.

    One index range scan per (batch, domain) on the partial index of unfilled slots, in task order, so a
    claim costs the same with 2,000 or 200,000 tasks in the pool.
    """
    for batch in Batch.objects.filter(status=BatchStatus.OPEN).order_by("id"):
        for domain in domains:
            slot = (
                TaskSlot.objects.select_for_update(skip_locked=True)
                .filter(batch_id=batch.id, domain=domain)
                .filter(Q(state=SlotState.FREE) | Q(state=SlotState.LEASED, lease_expires_at__lt=now))
                .exclude(task__assignments__annotator=user)
                .order_by("task_id", "index")
                .first()
            )
            if slot is not None:
                slot.batch = batch
                return slot
    return None


def _next_gold_task(user, domains: list[str], batch_id: int) -> ComparisonTask | None:
    return (
        ComparisonTask.objects.filter(
            is_gold=True, batch_id=batch_id, domain__in=domains, status=TaskStatus.OPEN
        )
        .exclude(assignments__annotator=user)
        .order_by("id")
        .first()
    )


@transaction.atomic
def assignment_claim_next(*, user, now: datetime | None = None) -> Assignment | None:
    """Lease the next task for this annotator, or return the lease they already hold; None if no work."""
    now = now or timezone.now()
    profile = _profile_for_update(user)
    held = Assignment.objects.filter(annotator=user, status=AssignmentStatus.LEASED).select_related("task__batch").first()
    if held is not None:
        if held.expires_at > now and held.task.batch.status == BatchStatus.OPEN:
            return held
        _expire(held, now)  # ran out, or its batch was closed meanwhile

    domains = profile.domains
    if not domains:
        return None
    slot = _next_slot(user, domains, now)
    if slot is None:
        return None
    batch = slot.batch
    expires_at = now + timedelta(seconds=batch.lease_seconds)

    if batch.gold_rate > 0 and gold_rng.random() < batch.gold_rate:
        gold = _next_gold_task(user, domains, batch.id)
        if gold is not None:
            # The slot lock is simply dropped at commit: it stays free for the next claim.
            return Assignment.objects.create(
                task=gold, annotator=user, leased_at=now, expires_at=expires_at
            )

    if slot.state == SlotState.LEASED:
        # Taking over a slot whose lease ran out: the old holder can no longer submit it.
        previous = Assignment.objects.get(pk=slot.assignment_id)
        previous.status = AssignmentStatus.EXPIRED
        previous.finished_at = now
        previous.save(update_fields=["status", "finished_at"])
    assignment = Assignment.objects.create(task_id=slot.task_id, annotator=user, leased_at=now, expires_at=expires_at)
    slot.state = SlotState.LEASED
    slot.assignment = assignment
    slot.lease_expires_at = expires_at
    slot.save(update_fields=["state", "assignment", "lease_expires_at"])
    return assignment


@dataclass(frozen=True)
class SubmitResult:
    annotation: Annotation
    created: bool  # False when this was a repeated submit of the same task
    continuation: ComparisonTask | None = None


def _validate_labels(task: ComparisonTask, choice, strength, safety_label) -> tuple[str, str, str]:
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
    if task.domain == Domain.SAFETY and not safety_label:
        raise InvalidInput("safety tasks need a safety_label", field="safety_label")
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
    assignment = (
        Assignment.objects.select_for_update(of=("self",))
        .select_related("task__batch")
        .filter(task_id=task_id, annotator=user)
        .first()
    )
    if assignment is None:
        raise NotFound(f"task {task_id} is not assigned to you; claim it with POST /api/v1/tasks/next/")
    if assignment.status == AssignmentStatus.SUBMITTED:
        return SubmitResult(annotation=assignment.annotation, created=False)
    if assignment.status in (AssignmentStatus.SKIPPED, AssignmentStatus.RELEASED):
        raise Conflict(f"task {task_id} was {assignment.status} and can no longer be submitted")
    if assignment.status == AssignmentStatus.EXPIRED:
        raise LeaseExpired(f"your lease on task {task_id} expired and the task went back to the pool")

    # Lock order everywhere: slot, then task. The task lock is NO KEY UPDATE so that concurrent claims,
    # whose inserts take FOR KEY SHARE on the task through the foreign key, are not blocked by it.
    slot = None
    if not assignment.task.is_gold:
        slot = TaskSlot.objects.select_for_update().filter(assignment=assignment).first()
        if slot is None or slot.state != SlotState.LEASED:
            raise LeaseExpired(f"your lease on task {task_id} expired and the task went back to the pool")
    task = ComparisonTask.objects.select_for_update(of=("self",), no_key=True).select_related("batch").get(pk=task_id)
    # A lease past its expiry is still honoured while nobody has taken the slot over.
    if task.batch.status != BatchStatus.OPEN:
        raise BatchClosed(f"batch {task.batch.name!r} is closed; this task can no longer be annotated")
    choice, strength, safety_label = _validate_labels(task, choice, strength, safety_label)
    if time_on_task_ms is not None and (not isinstance(time_on_task_ms, int) or time_on_task_ms < 0):
        raise InvalidInput("time_on_task_ms must be a non-negative integer", field="time_on_task_ms")
    served_ms = int((now - assignment.leased_at).total_seconds() * 1000)
    elapsed_ms = time_on_task_ms if time_on_task_ms is not None else served_ms
    # Flag on the shorter of what the client reports and what the server saw.
    too_fast = min(elapsed_ms, served_ms) < task.batch.too_fast_seconds * 1000

    annotation = Annotation.objects.create(
        task=task,
        annotator=user,
        assignment=assignment,
        choice=choice,
        strength=strength,
        safety_label=safety_label,
        note=note,
        time_on_task_ms=elapsed_ms,
        too_fast=too_fast,
    )
    assignment.status = AssignmentStatus.SUBMITTED
    assignment.finished_at = now
    assignment.save(update_fields=["status", "finished_at"])
    if slot is not None:
        slot.state = SlotState.FILLED
        slot.lease_expires_at = None
        slot.save(update_fields=["state", "lease_expires_at"])
    ComparisonTask.objects.filter(pk=task.pk).update(annotation_count=F("annotation_count") + 1)
    if not task.is_gold and task.annotation_count + 1 >= task.required_annotations:
        ComparisonTask.objects.filter(pk=task.pk).update(status=TaskStatus.COMPLETE)

    continuation = None
    if continue_with.strip():
        from .dialogues import dialogue_continue

        continuation = dialogue_continue(annotation=annotation, user_text=continue_with)
    return SubmitResult(annotation=annotation, created=True, continuation=continuation)


@transaction.atomic
def assignment_give_back(*, user, task_id: int, skip: bool, now: datetime | None = None) -> Assignment:
    """Skip (never serve again) or release (give back for now) a held task; its slot returns to the pool."""
    now = now or timezone.now()
    assignment = Assignment.objects.select_for_update().filter(task_id=task_id, annotator=user).first()
    if assignment is None:
        raise NotFound(f"task {task_id} is not assigned to you")
    if assignment.status != AssignmentStatus.LEASED:
        raise Conflict(f"task {task_id} is {assignment.status}, not leased; nothing to give back")
    assignment.status = AssignmentStatus.SKIPPED if skip else AssignmentStatus.RELEASED
    assignment.finished_at = now
    assignment.save(update_fields=["status", "finished_at"])
    TaskSlot.objects.filter(assignment=assignment, state=SlotState.LEASED).update(
        state=SlotState.FREE, assignment=None, lease_expires_at=None
    )
    return assignment
