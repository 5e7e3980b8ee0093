"""Human evaluation campaigns of policy versions (the report's section 3.4 and 4.4): rate a response, or compare
a candidate's response with a baseline's.

- A `rating` campaign shows one response of the candidate policy: a helpfulness prompt is rated 1-7 (Likert), a
  safety prompt 1-5 (1-2: a violation).
- A `pairwise` campaign shows the candidate's and the baseline's responses side by side, on the 7-point comparative
  scale (1: the left one is much better, 4: about the same, 7: the right one is much better). Which side holds the
  candidate is drawn per item and recorded (`candidate_left`); raters see no policy names.
Overlap is `required_ratings` raters an item (the report used 3); agreement is Gwet's AC2 and Krippendorff's alpha.
"""

from django.conf import settings
from django.db import models
from django.db.models import F, Q

from .content import DOMAIN_CHOICES


class CampaignKind(models.TextChoices):
    RATING = "rating", "Rate one response"
    PAIRWISE = "pairwise", "Compare two policies"


class CampaignStatus(models.TextChoices):
    OPEN = "open"
    CLOSED = "closed"


class Campaign(models.Model):
    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=16, choices=CampaignKind.choices)
    policy = models.ForeignKey("PolicyVersion", on_delete=models.PROTECT, related_name="campaigns",
                               help_text="the candidate: the version under evaluation")  # fmt: skip
    baseline = models.ForeignKey("PolicyVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=8, choices=CampaignStatus.choices, default=CampaignStatus.OPEN)
    overlap = models.PositiveSmallIntegerField(default=3, help_text="raters an item")
    lease_seconds = models.PositiveIntegerField(default=900)
    seed = models.PositiveIntegerField(default=0, help_text="draws which side holds the candidate")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(kind__in=CampaignKind.values), name="campaign_kind_valid"),
            models.CheckConstraint(condition=Q(status__in=CampaignStatus.values), name="campaign_status_valid"),
            models.CheckConstraint(condition=Q(overlap__gte=1), name="campaign_overlap_positive"),
            models.CheckConstraint(condition=Q(kind="rating", baseline__isnull=True)
                                   | Q(kind="pairwise", baseline__isnull=False), name="campaign_baseline_iff_pairwise"),
            models.CheckConstraint(condition=~Q(baseline=F("policy")), name="campaign_baseline_not_candidate"),
        ]  # fmt: skip

    def __str__(self) -> str:
        return self.name


class ItemStatus(models.TextChoices):
    AWAITING_RESPONSES = "awaiting_responses"
    OPEN = "open"
    COMPLETE = "complete"


class EvaluationItem(models.Model):
    """One prompt of a campaign: its context and the response(s) to rate."""

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="items")
    dialogue = models.ForeignKey("Dialogue", on_delete=models.PROTECT, related_name="evaluation_items")
    context_length = models.PositiveIntegerField()
    domain = models.CharField(max_length=16, choices=DOMAIN_CHOICES)
    risk_category = models.CharField(max_length=32, blank=True, default="")
    response = models.ForeignKey("Response", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    baseline_response = models.ForeignKey("Response", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    candidate_left = models.BooleanField(default=True, help_text="pairwise: the candidate's response is shown left")
    status = models.CharField(max_length=24, choices=ItemStatus.choices, default=ItemStatus.AWAITING_RESPONSES)
    required_ratings = models.PositiveSmallIntegerField(default=3)
    rating_count = models.PositiveIntegerField(default=0)

    class Meta:
        indexes = [models.Index(fields=["campaign", "status"])]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=ItemStatus.values), name="item_status_valid"),
            models.CheckConstraint(condition=Q(rating_count__lte=F("required_ratings")), name="item_ratings_within_overlap"),
            models.CheckConstraint(condition=Q(status="awaiting_responses", response__isnull=True)
                                   | (~Q(status="awaiting_responses") & Q(response__isnull=False)),
                                   name="item_response_unless_awaiting"),
            models.CheckConstraint(condition=models.lookups.Exact(models.functions.Mod(F("context_length"), 2), 1),
                                   name="item_context_ends_with_user_turn"),
        ]  # fmt: skip

    def __str__(self) -> str:
        return f"Item {self.pk} ({self.campaign_id})"


class EvaluationAssignment(models.Model):
    """An item leased to a rater; one per (item, rater), at most one live lease a rater."""

    item = models.ForeignKey(EvaluationItem, on_delete=models.CASCADE, related_name="assignments")
    rater = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="evaluation_assignments")
    status = models.CharField(max_length=12, default="leased")  # leased | submitted | released | expired
    leased_at = models.DateTimeField()
    expires_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["item", "rater"], name="evaluation_once_per_rater"),
            models.UniqueConstraint(fields=["rater"], condition=Q(status="leased"), name="evaluation_one_lease_per_rater"),
            models.CheckConstraint(condition=Q(status__in=["leased", "submitted", "released", "expired"]),
                                   name="evaluation_assignment_status_valid"),
        ]  # fmt: skip

    def __str__(self) -> str:
        return f"Evaluation lease {self.item_id} -> {self.rater_id} ({self.status})"


class RatingScale(models.TextChoices):
    HELPFULNESS = "helpfulness", "Helpfulness, 1-7"
    SAFETY = "safety", "Safety, 1-5"
    COMPARATIVE = "comparative", "Left vs right, 1-7"


SCALE_POINTS = {RatingScale.HELPFULNESS: 7, RatingScale.SAFETY: 5, RatingScale.COMPARATIVE: 7}


class EvaluationRating(models.Model):
    """One rater's score of one item, on the scale as shown (comparative: 1 = the left response much better)."""

    item = models.ForeignKey(EvaluationItem, on_delete=models.PROTECT, related_name="ratings")
    rater = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="evaluation_ratings")
    assignment = models.OneToOneField(EvaluationAssignment, on_delete=models.PROTECT, related_name="rating")
    scale = models.CharField(max_length=16, choices=RatingScale.choices)
    score = models.PositiveSmallIntegerField()
    note = models.TextField(blank=True, default="")
    time_on_task_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["item", "rater"], name="rating_once_per_rater"),
            models.CheckConstraint(condition=Q(scale__in=RatingScale.values), name="rating_scale_valid"),
            models.CheckConstraint(condition=Q(score__gte=1) & (Q(score__lte=5) | ~Q(scale="safety")) & Q(score__lte=7),
                                   name="rating_score_on_its_scale"),
        ]  # fmt: skip

    def __str__(self) -> str:
        return f"Rating {self.pk}: {self.score} ({self.scale})"

    @property
    def candidate_score(self) -> int:
        """Comparative scores as the candidate sees them (1: the candidate much better); others as they are."""
        if self.scale == RatingScale.COMPARATIVE and not self.item.candidate_left:
            return 8 - self.score
        return self.score
