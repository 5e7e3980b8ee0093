"""Reviewer and research-lead actions: adjudicate a task, edit guidelines, cancel a training run."""

from django.db import IntegrityError, transaction
from django.db.models import Count, F, Q, QuerySet

from annotation.models import (
    Adjudication,
    Annotation,
    ComparisonTask,
    Domain,
    Guideline,
    Role,
)
from annotation.scales import Choice, SafetyLabel, Strength

from .errors import Conflict, InvalidInput, NotFound, PermissionDenied

REVIEW_ROLES = (Role.REVIEWER, Role.RESEARCHER, Role.ADMIN)


def tasks_needing_review() -> QuerySet[ComparisonTask]:
    """Tasks not yet adjudicated whose annotators disagree on the choice, or where someone missed the gold answer."""
    disagreement = Q(is_gold=False, n_choices__gte=2)
    failed_gold = Q(is_gold=True, n_gold_misses__gte=1)
    return (
        ComparisonTask.objects.filter(adjudication__isnull=True, annotation_count__gte=1)
        .annotate(
            n_choices=Count("annotations__choice", distinct=True),
            n_gold_misses=Count("annotations", filter=~Q(annotations__choice=F("gold_choice"))),
        )
        .filter(disagreement | failed_gold)
        .select_related("batch")
        .order_by("batch_id", "id")
    )


def review_reason_for(task: ComparisonTask) -> str:
    """Why a task is in the review queue, in words."""
    annotations = list(Annotation.objects.filter(task=task).values_list("choice", flat=True))
    if task.is_gold:
        misses = sum(1 for c in annotations if c != task.gold_choice)
        return f"gold answer missed by {misses} of {len(annotations)}"
    return f"annotators disagree ({annotations.count('a')} chose A, {annotations.count('b')} chose B)"


@transaction.atomic
def adjudication_create(
    *, reviewer, reviewer_role: str, task_id: int, choice: str, strength: str, safety_label: str = "", reason: str
) -> Adjudication:
    """Record the final decision on a task, with the reviewer's reason; one per task."""
    if reviewer_role not in REVIEW_ROLES:
        raise PermissionDenied("only reviewers, researchers and admins may adjudicate")
    task = ComparisonTask.objects.select_for_update().filter(pk=task_id).first()
    if task is None:
        raise NotFound(f"task {task_id} does not exist")
    if choice not in {c.value for c in Choice}:
        raise InvalidInput("choose A or B", field="choice")
    if strength not in {s.value for s in Strength}:
        raise InvalidInput(f"strength must be one of {[s.value for s in Strength]}", field="strength")
    safety_label = safety_label or ""
    if safety_label and safety_label not in {s.value for s in SafetyLabel}:
        raise InvalidInput(f"safety label must be one of {[s.value for s in SafetyLabel]}", field="safety_label")
    if task.domain == Domain.SAFETY and not safety_label:
        raise InvalidInput("safety tasks need a safety label", field="safety_label")
    reason = (reason or "").strip()
    if not reason:
        raise InvalidInput("give a reason for the decision", field="reason")
    try:
        with transaction.atomic():
            return Adjudication.objects.create(
                task=task, reviewer=reviewer, choice=choice, strength=strength, safety_label=safety_label, reason=reason
            )
    except IntegrityError:
        raise Conflict(f"task {task_id} has already been adjudicated") from None


def guideline_save(*, domain: str, text: str, user) -> Guideline:
    """Create or replace the guidelines of a domain."""
    if domain not in Domain.values:
        raise InvalidInput(f"domain must be one of {Domain.values}", field="domain")
    guideline, _ = Guideline.objects.update_or_create(domain=domain, defaults={"text": text, "updated_by": user})
    return guideline
