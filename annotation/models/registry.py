"""Registry rows that the training side fills: policies, reward models and the runs that made them."""

from django.conf import settings
from django.db import models
from django.db.models import Q


class PolicyKind(models.TextChoices):
    EXTERNAL = "external"  # responses from outside the platform (imports)
    PRETRAINED = "pretrained"
    SFT = "sft"
    REJECTION_SAMPLING = "rejection_sampling"
    PPO = "ppo"
    DISTILLATION = "distillation"


class PolicyVersion(models.Model):
    """A policy checkpoint: SFT, RLHF-V1 ... Vn; one is current."""

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=24, choices=PolicyKind.choices, default=PolicyKind.SFT)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="children")
    checkpoint_uri = models.CharField(max_length=500, blank=True, default="")
    tokenizer_uri = models.CharField(max_length=500, blank=True, default="", help_text="tokenizer.model; blank: in or beside the checkpoint")
    metrics = models.JSONField(default=dict, blank=True, help_text="the stage's report and, once evaluated, 'evaluation'")
    is_current = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["is_current"], condition=Q(is_current=True), name="policy_one_current"),
            models.CheckConstraint(condition=~Q(parent=models.F("id")), name="policy_not_own_parent"),
        ]

    def __str__(self) -> str:
        return self.name


class RewardModelKind(models.TextChoices):
    HELPFULNESS = "helpfulness"
    SAFETY = "safety"


class RewardModelVersion(models.Model):
    """A trained reward model with its training data and Table 8 metrics."""

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=16, choices=RewardModelKind.choices)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="children")
    checkpoint_uri = models.CharField(max_length=500, blank=True, default="")
    batches = models.ManyToManyField("Batch", blank=True, related_name="reward_models")
    metrics = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.CheckConstraint(condition=Q(kind__in=RewardModelKind.values), name="rm_kind_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"


class RunStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RunKind(models.TextChoices):
    REWARD_MODEL = "reward_model"
    SFT = "sft"
    REJECTION_SAMPLING = "rejection_sampling"
    PPO = "ppo"
    DISTILLATION = "distillation"
    GENERATION = "generation"
    EVALUATION = "evaluation"
    ROUND = "round"  # a chain of the others: one round of the Llama 2 process


class TrainingRun(models.Model):
    """One job: parameters, status, progress, metrics over time, and the version it produced."""

    kind = models.CharField(max_length=24, choices=RunKind.choices)
    params = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=12, choices=RunStatus.choices, default=RunStatus.QUEUED)
    progress = models.FloatField(default=0.0)
    metrics = models.JSONField(default=list, blank=True, help_text="list of {step, ...} points")
    error = models.TextField(blank=True, default="")
    celery_task_id = models.CharField(max_length=64, blank=True, default="")
    # Durability: the worker that holds the run beats this while it works; a reconciler re-queues a run whose
    # heartbeat stopped (worker killed) or whose message was lost (queued_at long ago, never started).
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True, default="", help_text="host:pid holding the run")
    queued_at = models.DateTimeField(null=True, blank=True, help_text="when its message was last sent")
    attempts = models.PositiveIntegerField(default=0, help_text="times a worker started or resumed it")
    # A round's stages point at the round; a stage's `params` may name runs it follows.
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="stages")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    policy_version = models.ForeignKey(
        PolicyVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs"
    )
    reward_model_version = models.ForeignKey(
        RewardModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs"
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "heartbeat_at"], name="run_status_heartbeat_idx")]
        constraints = [
            models.CheckConstraint(condition=Q(progress__gte=0) & Q(progress__lte=1), name="run_progress_0_1"),
            models.CheckConstraint(condition=Q(status__in=RunStatus.values), name="run_status_valid"),
            models.CheckConstraint(condition=Q(kind__in=RunKind.values), name="run_kind_valid"),
        ]

    def __str__(self) -> str:
        return f"Run {self.pk} {self.kind} {self.status}"
