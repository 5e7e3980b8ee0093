from django.contrib import admin, messages

from annotation import models as m
from annotation.services.batches import batch_close
from annotation.services.errors import AnnotationError
from annotation.tasks import export_batch


@admin.register(m.AnnotatorProfile)
class AnnotatorProfileAdmin(admin.ModelAdmin):
    list_display = ["user", "role", "skill_helpfulness", "skill_safety", "created_at"]
    list_filter = ["role", "skill_helpfulness", "skill_safety"]
    search_fields = ["user__username", "user__email"]
    autocomplete_fields = ["user"]


@admin.register(m.Prompt)
class PromptAdmin(admin.ModelAdmin):
    list_display = ["id", "domain", "risk_category", "source", "author", "created_at"]
    list_filter = ["domain", "risk_category", "source"]
    search_fields = ["text"]
    raw_id_fields = ["author"]


class TurnInline(admin.TabularInline):
    model = m.Turn
    extra = 0
    raw_id_fields = ["response"]


@admin.register(m.Dialogue)
class DialogueAdmin(admin.ModelAdmin):
    list_display = ["id", "prompt", "created_at"]
    search_fields = ["prompt__text", "turns__text"]
    raw_id_fields = ["prompt"]
    inlines = [TurnInline]


@admin.register(m.Turn)
class TurnAdmin(admin.ModelAdmin):
    list_display = ["dialogue", "position", "role"]
    list_filter = ["role"]
    search_fields = ["text"]
    raw_id_fields = ["dialogue", "response"]


@admin.register(m.Response)
class ResponseAdmin(admin.ModelAdmin):
    list_display = ["id", "policy_version", "context_length", "created_at"]
    list_filter = ["policy_version"]
    search_fields = ["text"]
    raw_id_fields = ["dialogue"]


@admin.action(description="Close the selected batches (fixes their test split)")
def close_batches(modeladmin, request, queryset):
    for batch in queryset:
        try:
            batch_close(batch_id=batch.pk)
            modeladmin.message_user(request, f"closed {batch.name}")
        except AnnotationError as e:
            modeladmin.message_user(request, e.message, level=messages.WARNING)


@admin.action(description="Export the selected batches (native JSONL, in the background)")
def export_batches(modeladmin, request, queryset):
    for batch in queryset:
        export_batch.delay_on_commit(batch.pk, "native")
    modeladmin.message_user(request, f"queued {queryset.count()} export(s) to ARTIFACTS_DIR/exports/")


@admin.register(m.Batch)
class BatchAdmin(admin.ModelAdmin):
    list_display = ["name", "status", "overlap", "gold_rate", "created_at", "closed_at"]
    list_filter = ["status"]
    search_fields = ["name"]
    actions = [close_batches, export_batches]
    readonly_fields = ["status", "closed_at"]


@admin.register(m.ComparisonTask)
class ComparisonTaskAdmin(admin.ModelAdmin):
    list_display = ["id", "batch", "domain", "status", "annotation_count", "required_annotations", "is_gold", "split"]
    list_filter = ["status", "domain", "is_gold", "split", "batch"]
    search_fields = ["dialogue__prompt__text"]
    raw_id_fields = ["dialogue", "response_a", "response_b", "opened_by"]


@admin.register(m.TaskSlot)
class TaskSlotAdmin(admin.ModelAdmin):
    list_display = ["task", "index", "state", "domain", "lease_expires_at"]
    list_filter = ["state", "domain"]
    raw_id_fields = ["task", "assignment"]


@admin.register(m.Assignment)
class AssignmentAdmin(admin.ModelAdmin):
    list_display = ["task", "annotator", "status", "leased_at", "expires_at", "finished_at"]
    list_filter = ["status"]
    search_fields = ["annotator__username"]
    raw_id_fields = ["task", "annotator"]


@admin.register(m.Annotation)
class AnnotationAdmin(admin.ModelAdmin):
    list_display = ["id", "task", "annotator", "choice", "strength", "safety_label", "too_fast", "created_at"]
    list_filter = ["choice", "strength", "safety_label", "too_fast", "task__domain", "task__batch"]
    search_fields = ["annotator__username", "note"]
    raw_id_fields = ["task", "annotator", "assignment"]


@admin.register(m.PolicyVersion)
class PolicyVersionAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "parent", "is_current", "created_at"]
    list_filter = ["kind", "is_current"]
    search_fields = ["name", "checkpoint_uri"]


@admin.register(m.RewardModelVersion)
class RewardModelVersionAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "parent", "created_at"]
    list_filter = ["kind"]
    search_fields = ["name", "checkpoint_uri"]
    filter_horizontal = ["batches"]


@admin.register(m.TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "status", "progress", "created_at", "finished_at"]
    list_filter = ["kind", "status"]
    search_fields = ["error", "celery_task_id"]

from annotation import admin_review  # noqa: E402, F401  (adjudications and guidelines)
