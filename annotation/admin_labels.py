"""Annotation labels in the words annotators see, for the admin pages (annotation.admin, annotation.admin_review)."""

from django.contrib import admin

from annotation.scales import CHOICE_TEXT, SAFETY_TEXT, STRENGTH_TEXT

# The labels annotators see (the models' choices carry the enum names: changing them would need a migration).
CHOICE_LABELS = [(c.value, text) for c, text in CHOICE_TEXT.items()]
STRENGTH_LABELS = [(s.value, text) for s, text in STRENGTH_TEXT.items()]
SAFETY_LABELS = [*[(s.value, text) for s, text in SAFETY_TEXT.items()], ("", "None (helpfulness)")]


def labelled_filter(field: str, title: str, choices: list[tuple[str, str]]) -> type[admin.SimpleListFilter]:
    """A list filter on `field` showing `choices`' labels instead of the stored codes."""

    class Filter(admin.SimpleListFilter):
        parameter_name = field

        def lookups(self, request, model_admin):
            return [(value or "none", label) for value, label in choices]

        def queryset(self, request, queryset):
            value = self.value()
            if value is None:
                return queryset
            return queryset.filter(**{field: "" if value == "none" else value})

    Filter.title = title
    Filter.__name__ = f"{field.title().replace('_', '')}Filter"
    return Filter


LABELLED_FILTERS = [
    labelled_filter("choice", "choice", CHOICE_LABELS),
    labelled_filter("strength", "strength", STRENGTH_LABELS),
    labelled_filter("safety_label", "safety label", SAFETY_LABELS),
]



class LabelColumns:
    """Choice, strength and safety columns in the words annotators see."""

    @admin.display(description="choice", ordering="choice")
    def choice_label(self, obj):
        return dict(CHOICE_LABELS).get(obj.choice, obj.choice)

    @admin.display(description="strength", ordering="strength")
    def strength_label(self, obj):
        return dict(STRENGTH_LABELS).get(obj.strength, obj.strength or "–")

    @admin.display(description="safety", ordering="safety_label")
    def safety_text(self, obj):
        return dict(SAFETY_LABELS).get(obj.safety_label, obj.safety_label) if obj.safety_label else "–"
