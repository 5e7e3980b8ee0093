"""Admin for adjudications and the guidelines (admins edit the Markdown here)."""

from django.contrib import admin

from annotation.admin_labels import LABELLED_FILTERS, LabelColumns
from annotation.models import Adjudication, Guideline


@admin.register(Guideline)
class GuidelineAdmin(admin.ModelAdmin):
    list_display = ["domain", "updated_by", "updated_at"]
    readonly_fields = ["updated_by", "updated_at"]

    def save_model(self, request, obj, form, change):
        obj.updated_by = request.user
        super().save_model(request, obj, form, change)


@admin.register(Adjudication)
class AdjudicationAdmin(LabelColumns, admin.ModelAdmin):
    list_display = ["task", "reviewer", "choice_label", "strength_label", "safety_text", "created_at"]
    list_filter = LABELLED_FILTERS
    search_fields = ["reason"]
    raw_id_fields = ["task", "reviewer"]
