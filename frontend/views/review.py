"""The reviewer's queue: tasks whose annotators disagree or missed the gold answer, and adjudication."""

from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render

from annotation.models import Adjudication, Annotation, ComparisonTask, Turn
from annotation.selectors import task_context
from annotation.services.errors import AnnotationError
from annotation.services.review import adjudication_create, review_reason_for, tasks_needing_review

from ..access import REVIEW_ROLES, role_required
from ..forms import AdjudicationForm
from .annotate import SAFETY_KEYS, STRENGTH_KEYS


def next_in_queue(after: ComparisonTask) -> ComparisonTask | None:
    """The item after `after` in the review queue's order (batch, then id), else the first one left."""
    queue = tasks_needing_review().exclude(pk=after.pk)
    later = queue.filter(batch_id=after.batch_id, id__gt=after.id) | queue.filter(batch_id__gt=after.batch_id)
    return later.order_by("batch_id", "id").first() or queue.first()


def continuation_texts(annotations) -> dict[int, str]:
    """Annotation id -> the user's next message, for annotations whose annotator continued the dialogue (the
    last context turn of the comparison each one opened)."""
    opened = ComparisonTask.objects.filter(opened_by__in=[a.pk for a in annotations]).values_list(
        "opened_by_id", "dialogue_id", "context_length"
    )
    texts = {}
    for annotation_id, dialogue_id, context_length in opened:
        turn = Turn.objects.filter(dialogue_id=dialogue_id, position=context_length - 1).values_list("text", flat=True)
        texts[annotation_id] = turn.first() or ""
    return texts


@role_required(*REVIEW_ROLES)
def review_queue(request):
    tasks = list(tasks_needing_review()[:200])
    for task in tasks:
        task.review_reason = review_reason_for(task)
    recent = Adjudication.objects.select_related("task", "reviewer").order_by("-created_at")[:20]
    return render(request, "frontend/review_queue.html", {"tasks": tasks, "recent": recent, "nav": "review"})


@role_required(*REVIEW_ROLES)
def review_task(request, task_id: int):
    task = get_object_or_404(
        ComparisonTask.objects.select_related("batch", "dialogue__prompt", "response_a", "response_b"), pk=task_id
    )
    form = AdjudicationForm(request.POST or None)
    status = 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            try:
                adjudication_create(reviewer=request.user, reviewer_role=request.role, task_id=task.id, **form.cleaned_data)
            except AnnotationError as error:
                form.add_error(error.field if error.field in form.fields else None, error.message)
                status = error.status_code
            else:
                messages.success(request, f"Task {task.id} adjudicated.")
                # Straight on to the next item of the queue, when there is one.
                if (following := next_in_queue(task)) is not None:
                    return redirect("frontend:review-task", task_id=following.id)
                return redirect("frontend:review")
    annotations = list(
        Annotation.objects.filter(task=task).select_related("annotator__profile").order_by("created_at")
    )
    continued = continuation_texts(annotations)
    for a in annotations:
        a.continuation_text = continued.get(a.pk)
    following = next_in_queue(task)
    return render(
        request,
        "frontend/review_task.html",
        {
            "task": task,
            "dialogue": task_context(task),
            "annotations": annotations,
            "adjudication": Adjudication.objects.filter(task=task).select_related("reviewer").first(),
            "form": form,
            "next_task": following,
            "strength_keys": STRENGTH_KEYS,
            "safety_keys": SAFETY_KEYS,
            "nav": "review",
        },
        status=status,
    )
