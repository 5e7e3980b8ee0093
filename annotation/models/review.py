"""What reviewers and admins add on top of the annotations: adjudications and the written guidelines."""

from django.conf import settings
from django.db import models
from django.db.models import Q

from annotation.scales import Choice, SafetyLabel, Strength

from .content import DOMAIN_CHOICES


class Adjudication(models.Model):
    """A reviewer's final decision on a task whose annotators disagreed or missed its gold answer."""

    task = models.OneToOneField("ComparisonTask", on_delete=models.PROTECT, related_name="adjudication")
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="adjudications")
    choice = models.CharField(max_length=1, choices=[(c.value, c.name) for c in Choice])
    strength = models.CharField(max_length=24, choices=[(s.value, s.name) for s in Strength])
    safety_label = models.CharField(
        max_length=32, choices=[(s.value, s.name) for s in SafetyLabel], blank=True, default=""
    )
    reason = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=~Q(reason=""), name="adjudication_reason_not_empty"),
            models.CheckConstraint(condition=Q(choice__in=[c.value for c in Choice]), name="adjudication_choice_valid"),
            models.CheckConstraint(
                condition=Q(strength__in=[s.value for s in Strength]), name="adjudication_strength_valid"
            ),
            models.CheckConstraint(
                condition=Q(safety_label__in=["", *[s.value for s in SafetyLabel]]), name="adjudication_safety_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"Adjudication of task {self.task_id}: {self.choice} {self.strength}"


class Guideline(models.Model):
    """The annotation guidelines of one domain, in Markdown; admins edit them."""

    domain = models.CharField(max_length=16, choices=DOMAIN_CHOICES, unique=True)
    text = models.TextField(help_text="Markdown; raw HTML is shown as text")
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(domain__in=["helpfulness", "safety"]), name="guideline_domain_valid"),
        ]

    def __str__(self) -> str:
        return f"Guidelines: {self.domain}"
