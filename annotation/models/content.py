from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.db.models.functions import Mod
from django.db.models.lookups import Exact


class RiskCategory(models.TextChoices):
    """Safety risk categories of the Llama 2 guidelines; `uncategorized` for imported data without one."""

    ILLICIT_CRIMINAL = "illicit_criminal", "Illicit and criminal activities"
    HATEFUL_HARMFUL = "hateful_harmful", "Hateful and harmful activities"
    UNQUALIFIED_ADVICE = "unqualified_advice", "Unqualified advice"
    UNCATEGORIZED = "uncategorized", "Uncategorized"


DOMAIN_CHOICES = [("helpfulness", "Helpfulness"), ("safety", "Safety")]


class Prompt(models.Model):
    """The first user message of a dialogue, written by an annotator or imported."""

    text = models.TextField()
    domain = models.CharField(max_length=16, choices=DOMAIN_CHOICES)
    risk_category = models.CharField(max_length=32, choices=RiskCategory.choices, blank=True, default="")
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="prompts"
    )
    source = models.CharField(max_length=64, default="ui", help_text="ui, api, or the import format")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=~Q(text=""), name="prompt_text_not_empty"),
            models.CheckConstraint(condition=Q(domain__in=["helpfulness", "safety"]), name="prompt_domain_valid"),
            # Safety prompts carry a risk category; helpfulness prompts carry none.
            models.CheckConstraint(
                condition=(Q(domain="safety") & Q(risk_category__in=RiskCategory.values))
                | (Q(domain="helpfulness") & Q(risk_category="")),
                name="prompt_risk_category_matches_domain",
            ),
        ]

    def __str__(self) -> str:
        return f"[{self.domain}] {self.text[:60]}"


class Dialogue(models.Model):
    """A multi-turn conversation that starts with a prompt; its turns are user messages and chosen replies."""

    prompt = models.ForeignKey(Prompt, on_delete=models.PROTECT, related_name="dialogues")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"Dialogue {self.pk}"


class TurnRole(models.TextChoices):
    USER = "user"
    ASSISTANT = "assistant"


class Turn(models.Model):
    """One message; even positions are the user's, odd ones the assistant's chosen reply."""

    dialogue = models.ForeignKey(Dialogue, on_delete=models.CASCADE, related_name="turns")
    position = models.PositiveIntegerField()
    role = models.CharField(max_length=16, choices=TurnRole.choices)
    text = models.TextField()
    # For an assistant turn: the response that an annotator chose (null for imported history).
    response = models.ForeignKey("Response", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    class Meta:
        ordering = ["dialogue", "position"]
        constraints = [
            models.UniqueConstraint(fields=["dialogue", "position"], name="turn_position_unique"),
            models.CheckConstraint(
                condition=Q(Exact(Mod(F("position"), 2), 0), role="user")
                | Q(Exact(Mod(F("position"), 2), 1), role="assistant"),
                name="turn_roles_alternate",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role}@{self.position}: {self.text[:40]}"


class Response(models.Model):
    """A model reply to a dialogue state, always traceable to the policy and sampling that produced it."""

    dialogue = models.ForeignKey(Dialogue, on_delete=models.CASCADE, related_name="responses")
    # Number of turns of context this reply follows (the reply would sit at this position).
    context_length = models.PositiveIntegerField()
    text = models.TextField()
    policy_version = models.ForeignKey("PolicyVersion", on_delete=models.PROTECT, related_name="responses")
    sampling = models.JSONField(default=dict, blank=True, help_text="temperature, top_p, seed, ...")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(Exact(Mod(F("context_length"), 2), 1)), name="response_follows_user_turn"
            ),
        ]

    def __str__(self) -> str:
        return f"Response {self.pk} by {self.policy_version_id}"
