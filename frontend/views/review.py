"""The reviewer's queue: tasks whose annotators disagree or missed the gold answer, and adjudication."""

from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render

from annotation.models import Adjudication, Annotation, ComparisonTask
from annotation.selectors import task_context
from annotation.services.errors import AnnotationError
from annotation.services.review import adjudication_create, review_reason_for, tasks_needing_review

from ..access import REVIEW_ROLES, role_required
from ..forms import AdjudicationForm


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
                return redirect("frontend:review")
    annotations = Annotation.objects.filter(task=task).select_related("annotator__profile").order_by("created_at")
    return render(
        request,
        "frontend/review_task.html",
        {
            "task": task,
            "dialogue": task_context(task),
            "annotations": annotations,
            "adjudication": Adjudication.objects.filter(task=task).select_related("reviewer").first(),
            "form": form,
            "nav": "review",
        },
        status=status,
    )
