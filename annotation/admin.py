from django.contrib import admin, messages
from django.utils.html import format_html, format_html_join

from annotation import models as m
from annotation.admin_labels import LABELLED_FILTERS, LabelColumns
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


class AnnotationInline(LabelColumns, admin.TabularInline):
    """A task's annotations, read-only: they are changed through the annotation workflow, never here."""

    model = m.Annotation
    extra = 0
    can_delete = False
    show_change_link = True
    fields = ["annotator", "choice_label", "strength_label", "safety_text", "note", "time_on_task_ms", "too_fast",
              "created_at"]  # fmt: skip
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False



def _text_block(text: str | None):
    if text is None:
        return "–"
    return format_html('<div style="white-space: pre-wrap; max-width: 60em">{}</div>', text or "(empty response)")


@admin.register(m.ComparisonTask)
class ComparisonTaskAdmin(admin.ModelAdmin):
    list_display = ["id", "batch", "domain", "status", "annotation_count", "required_annotations", "is_gold", "split"]
    list_filter = ["status", "domain", "is_gold", "split", "batch"]
    search_fields = ["dialogue__prompt__text"]
    raw_id_fields = ["dialogue", "response_a", "response_b", "opened_by"]
    # Status and counts follow the annotation workflow (slots, overlap): shown, not edited.
    readonly_fields = ["status", "annotation_count", "required_annotations", "context", "response_a_text",
                       "response_b_text"]  # fmt: skip
    inlines = [AnnotationInline]

    @admin.display(description="dialogue so far")
    def context(self, obj):
        from annotation.selectors import task_context

        if obj.pk is None:
            return "–"
        return format_html_join(
            "", '<p><strong>{}:</strong> <span style="white-space: pre-wrap">{}</span></p>',
            ((turn["role"].capitalize(), turn["content"]) for turn in task_context(obj)),
        )  # fmt: skip

    @admin.display(description="response A")
    def response_a_text(self, obj):
        return _text_block(obj.response_a.text if obj.response_a_id else None)

    @admin.display(description="response B")
    def response_b_text(self, obj):
        return _text_block(obj.response_b.text if obj.response_b_id else None)


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
class AnnotationAdmin(LabelColumns, admin.ModelAdmin):
    list_display = ["id", "task", "annotator", "choice_label", "strength_label", "safety_text", "too_fast", "created_at"]
    list_filter = [*LABELLED_FILTERS, "too_fast", "task__domain", "task__batch"]
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
