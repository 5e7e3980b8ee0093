"""Admin for adjudications and the guidelines (admins edit the Markdown here)."""

from django.contrib import admin

from annotation.models import Adjudication, Guideline


@admin.register(Guideline)
class GuidelineAdmin(admin.ModelAdmin):
    list_display = ["domain", "updated_by", "updated_at"]
    readonly_fields = ["updated_by", "updated_at"]

    def save_model(self, request, obj, form, change):
        obj.updated_by = request.user
        super().save_model(request, obj, form, change)


@admin.register(Adjudication)
class AdjudicationAdmin(admin.ModelAdmin):
    list_display = ["task", "reviewer", "choice", "strength", "safety_label", "created_at"]
    list_filter = ["choice", "strength", "safety_label"]
    search_fields = ["reason"]
    raw_id_fields = ["task", "reviewer"]
