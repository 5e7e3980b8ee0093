"""The comparison workbench: one page, and JSON calls that submit (or skip) and return the next task at once.

Writes go through the same services as the REST API (lease, validation, blindness), so the page follows the
API's rules; the combined submit-and-next call is what lets the next comparison appear in one round trip.
"""

from datetime import datetime, time
from types import SimpleNamespace

from django.contrib import messages
from django.db.models import Count, Exists, OuterRef, Q
from django.http import JsonResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from annotation.models import (
    Annotation,
    AnnotatorProfile,
    Assignment,
    AssignmentStatus,
    BatchStatus,
    ComparisonTask,
    TaskStatus,
)
from annotation.scales import SAFETY_TEXT, STRENGTH_TEXT, SafetyLabel, Strength
from annotation.selectors import task_context
from annotation.services.assignment import (
    annotation_submit,
    annotation_undo_last,
    assignment_claim_next,
    assignment_give_back,
)
from annotation.services.errors import AnnotationError, InvalidInput
from annotation.throttling import ExactScopedRateThrottle
from annotation.validation import (
    MAX_LABEL_CHARS,
    MAX_MESSAGE_CHARS,
    MAX_NOTE_CHARS,
    check_request_json,
    check_text,
    check_time_on_task_ms,
    parse_json,
)

from ..access import role_required

# Keyboard map shown on the page and used by annotate.js (one source of truth).
STRENGTH_KEYS = [(key, s, STRENGTH_TEXT[s]) for key, s in zip("asdf", Strength, strict=True)]
SAFETY_KEYS = [(key, s, SAFETY_TEXT[s]) for key, s in zip("jkl", SafetyLabel, strict=True)]


def _midnight():
    return timezone.make_aware(datetime.combine(timezone.localdate(), time.min))


def progress_for(user, batch_id: int | None, *, with_remaining: bool) -> dict:
    """The annotator's own counts: today, and in the batch of the task at hand (never anyone else's labels).

    `batch_remaining` scans the batch's open tasks (about 100 ms at 20,000), so it is computed when the page
    loads, not on the submit path; the page counts it down itself.
    """
    midnight = _midnight()
    counts = Annotation.objects.filter(annotator=user).aggregate(
        today=Count("id", filter=Q(created_at__gte=midnight)),
        in_batch=Count("id", filter=Q(task__batch_id=batch_id or 0)),
    )
    remaining = None
    if batch_id and with_remaining:
        # Open comparisons of this batch this annotator could still be served (an upper bound on their work):
        # in the domains they are trained on (the claim serves no others), not yet answered or skipped by them;
        # the one on screen counts, it is still to do. Gold tasks count too: were they left out, the count
        # would stay put when the task served is gold and drop by one otherwise, telling which tasks are gold.
        profile = AnnotatorProfile.objects.filter(user=user).first()
        domains = profile.domains if profile else AnnotatorProfile().domains
        served = Assignment.objects.filter(task_id=OuterRef("pk"), annotator=user).exclude(
            status=AssignmentStatus.LEASED
        )
        remaining = (
            ComparisonTask.objects.filter(batch_id=batch_id, status=TaskStatus.OPEN, domain__in=domains)
            .exclude(Exists(served))
            .count()
        )
    return {"today": counts["today"], "in_batch": counts["in_batch"], "batch_remaining": remaining}


def task_payload(assignment: Assignment) -> dict:
    """What the page shows for a leased task: context and the two responses, nothing of other annotators."""
    task = ComparisonTask.objects.select_related("batch", "dialogue__prompt", "response_a", "response_b").get(
        pk=assignment.task_id
    )
    return {
        "task_id": task.id,
        "batch": task.batch.name,
        "batch_id": task.batch_id,
        "domain": task.domain,
        "risk_category": task.dialogue.prompt.get_risk_category_display() if task.dialogue.prompt.risk_category else "",
        "dialogue": task_context(task),
        "response_a": task.response_a.text,
        "response_b": task.response_b.text,
        "expires_at": assignment.expires_at.isoformat(),
    }


def next_payload(user, *, with_remaining: bool = False) -> dict:
    assignment = assignment_claim_next(user=user)
    task = task_payload(assignment) if assignment else None
    return {
        "task": task,
        "progress": progress_for(user, task["batch_id"] if task else None, with_remaining=with_remaining),
        "server_now": timezone.now().isoformat(),
    }


def throttle_message(request, scope: str) -> str | None:
    """None while the API's rate limit `scope` (settings REST_FRAMEWORK DEFAULT_THROTTLE_RATES) allows the
    request, else what to tell the annotator: the page's calls count against the API's limits too."""
    throttle = ExactScopedRateThrottle()
    if throttle.allow_request(request, SimpleNamespace(throttle_scope=scope)):
        return None
    return f"Too many requests; wait {throttle.wait() or 1:.0f} s and press Enter again."


def throttled(request, scope: str) -> JsonResponse | None:
    """A 429 response when the rate limit `scope` is reached, else None."""
    if (message := throttle_message(request, scope)) is None:
        return None
    return JsonResponse({"error": {"code": "throttled", "message": message, "field": None}}, status=429)


def error_response(error: AnnotationError) -> JsonResponse:
    return JsonResponse(
        {"error": {"code": error.code, "message": error.message, "field": error.field}}, status=error.status_code
    )


def _body(request) -> dict:
    """The JSON object posted, checked as the API checks its bodies (annotation.validation)."""
    data = parse_json(request.body or b"{}")
    if not isinstance(data, dict):
        raise InvalidInput("the request body must be a JSON object")
    check_request_json(data)
    return data


def _text(data: dict, name: str, limit: int) -> str:
    value = data.get(name)
    return "" if value is None else check_text(value, field=name, max_length=limit)


@role_required()
def annotate_page(request):
    """The workbench shell; annotate.js claims the first task as soon as it loads."""
    return render(
        request,
        "frontend/annotate.html",
        {"strength_keys": STRENGTH_KEYS, "safety_keys": SAFETY_KEYS, "nav": "annotate"},
    )


@require_POST
@role_required()
def annotate_next(request):
    """Claim the next comparison (or the one already held)."""
    if limited := throttled(request, "claim"):
        return limited
    try:
        return JsonResponse(next_payload(request.user, with_remaining=True))
    except AnnotationError as error:
        return error_response(error)


@require_POST
@role_required()
def annotate_submit(request, task_id: int):
    """Submit a judgement and return the next comparison in the same response."""
    if limited := throttled(request, "submit"):
        return limited
    try:
        data = _body(request)
        result = annotation_submit(
            user=request.user,
            task_id=task_id,
            choice=_text(data, "choice", MAX_LABEL_CHARS),
            strength=_text(data, "strength", MAX_LABEL_CHARS),
            safety_label=_text(data, "safety_label", MAX_LABEL_CHARS),
            note=_text(data, "note", MAX_NOTE_CHARS),
            time_on_task_ms=check_time_on_task_ms(data.get("time_on_task_ms")),
            continue_with=_text(data, "continue_with", MAX_MESSAGE_CHARS),
        )
        # The next comparison is a claim: it counts against the claim limit too. The submit is saved either way.
        if withheld := throttle_message(request, "claim"):
            payload = {"task": None, "progress": progress_for(request.user, None, with_remaining=False),
                       "server_now": timezone.now().isoformat(), "next_withheld": withheld}  # fmt: skip
        else:
            payload = next_payload(request.user)
    except AnnotationError as error:
        return error_response(error)
    payload["submitted"] = {
        "task_id": task_id,
        "created": result.created,
        "continuation_task_id": result.continuation.id if result.continuation else None,
    }
    return JsonResponse(payload)


@require_POST
@role_required()
def annotate_skip(request, task_id: int):
    """Skip a comparison (it is never served to this annotator again) and return the next one."""
    try:
        assignment_give_back(user=request.user, task_id=task_id, skip=True)
        payload = next_payload(request.user)
    except AnnotationError as error:
        return error_response(error)
    payload["skipped"] = task_id
    return JsonResponse(payload)


@role_required()
def annotate_history(request):
    """The annotator's own answers of today, newest first; the newest can be undone while its task is open."""
    today = list(
        Annotation.objects.filter(annotator=request.user, created_at__gte=_midnight())
        .select_related("task__batch")
        .order_by("-created_at", "-id")
    )
    latest = Annotation.objects.filter(annotator=request.user).order_by("-created_at", "-id").first()
    undo = None
    if latest is not None and today and latest.pk == today[0].pk:
        if latest.task.batch.status != BatchStatus.OPEN:
            undo = {"annotation": latest, "refused": "its batch is closed"}
        elif latest.task.status != TaskStatus.OPEN:
            undo = {"annotation": latest, "refused": "its comparison is complete"}
        else:
            undo = {"annotation": latest, "refused": ""}
    return render(
        request,
        "frontend/annotate_history.html",
        {"annotations": today, "undo": undo, "nav": "annotate"},
    )


@require_POST
@role_required()
def annotate_undo(request, annotation_id: int):
    """Undo the annotator's most recent answer (see annotation_undo_last); refusals are shown on the page."""
    try:
        result = annotation_undo_last(user=request.user, annotation_id=annotation_id)
    except AnnotationError as error:
        messages.error(request, f"Not undone: {error.message}.")
    else:
        messages.success(
            request,
            f"Your answer on comparison {result.task_id} ({result.batch_name}) was withdrawn; "
            "the comparison goes back to the pool and may be served to you again.",
        )
    return redirect("frontend:annotate-history")
