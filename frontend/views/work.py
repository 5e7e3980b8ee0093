"""The researcher's cockpit for data: backlogs at a glance, batches created (from an import file, from a prompts
file and a policy, or from the prompts waiting for responses), closed, and exported a click away."""

import uuid
from pathlib import Path

from django.conf import settings
from django.contrib import messages
from django.db import transaction
from django.db.models import Count, Q
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from annotation.importers import parse_file
from annotation.models import (
    Batch,
    TaskStatus,
)
from annotation.selectors import work_backlogs
from annotation.services.batches import batch_close
from annotation.services.errors import AnnotationError
from annotation.services.exports import FORMATS
from annotation.services.imports import comparisons_store
from annotation.services.runs import run_create

from ..access import DASHBOARD_ROLES, role_required
from ..forms import BatchCreateForm


def _save_upload(upload) -> Path:
    """An uploaded file on the shared volume, where a worker can read it."""
    folder = Path(settings.ARTIFACTS_DIR) / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}-{Path(upload.name).name}"
    with path.open("wb") as f:
        for chunk in upload.chunks():
            f.write(chunk)
    return path


def _create(form: BatchCreateForm, user) -> str:
    d = form.cleaned_data
    source = d["source"]
    if source == "import":
        path = _save_upload(d["file"])
        try:
            records, _ = parse_file(d["format"], path, domain=d["domain"])
        except AnnotationError as error:
            raise AnnotationError(f"{d['file'].name}: {error.message} (nothing was imported)") from None
        if not records:
            raise AnnotationError(f"{d['file'].name}: no comparisons found")
        with transaction.atomic():
            batch, _ = Batch.objects.get_or_create(name=d["name"], defaults={"overlap": d["overlap"],
                                                                             "test_size": d["test_size"]})  # fmt: skip
            stored = comparisons_store(batch=batch, records=records, create_external_policies=True)
        return f"Batch {d['name']}: {stored.created} comparisons imported with {stored.annotations} annotations."
    if source == "prompts":
        path = _save_upload(d["file"])
        run = run_create(kind="generation", user=user, params={
            "prompts": str(path), "batch": d["name"], "overlap": d["overlap"], "test_size": d["test_size"],
            **({"policy": d["policy"]} if d.get("policy") else {})})  # fmt: skip
        return f"Run {run.pk} queued: the model worker opens batch {d['name']} with its responses."
    run = run_create(kind="generation", params={"pending": True}, user=user)
    return f"Run {run.pk} queued: the model worker answers every prompt waiting for responses."


@role_required(*DASHBOARD_ROLES)
def work(request):
    form = BatchCreateForm(request.POST or None, request.FILES or None)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            try:
                messages.success(request, _create(form, request.user))
                return redirect("frontend:work")
            except AnnotationError as error:
                form.add_error(None, error.message)
        status = 400
    batches = list(Batch.objects.annotate(
        n_tasks=Count("tasks"), n_open=Count("tasks", filter=Q(tasks__status=TaskStatus.OPEN)),
        n_waiting=Count("tasks", filter=Q(tasks__status=TaskStatus.AWAITING_RESPONSES)),
        n_complete=Count("tasks", filter=Q(tasks__status=TaskStatus.COMPLETE)),
    ).order_by("-created_at", "-id")[:50])  # fmt: skip
    export = reverse("export-comparisons")
    for b in batches:
        b.exports = [(fmt, split, f"{export}?batch={b.name}&format={fmt}" + (f"&split={split}" if split else ""))
                     for fmt in FORMATS for split in ("", "train", "test")]  # fmt: skip
    return render(request, "frontend/work.html", {"nav": "work", "form": form, "batches": batches,
                                                  "backlogs": work_backlogs()}, status=status)  # fmt: skip


@require_POST
@role_required(*DASHBOARD_ROLES)
def batch_close_view(request, batch_id: int):
    try:
        batch = batch_close(batch_id=batch_id)
    except AnnotationError as error:
        messages.error(request, error.message)
    else:
        messages.success(request, f"Batch {batch.name} closed: its test split is fixed.")
    return redirect("frontend:work")
