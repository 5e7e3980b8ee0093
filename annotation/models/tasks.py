from django.conf import settings
from django.db import models
from django.db.models import F, Q

from annotation.scales import Choice, SafetyLabel, Strength

from .content import DOMAIN_CHOICES


class Domain(models.TextChoices):
    HELPFULNESS = "helpfulness"
    SAFETY = "safety"


class Split(models.TextChoices):
    TRAIN = "train"
    TEST = "test"


class BatchStatus(models.TextChoices):
    OPEN = "open"  # collecting annotations
    CLOSED = "closed"  # frozen: split fixed, what reward models train on


class Batch(models.Model):
    """A weekly unit of data collection with its own overlap, gold rate and fixed held-out test split."""

    name = models.CharField(max_length=100, unique=True)
    status = models.CharField(max_length=16, choices=BatchStatus.choices, default=BatchStatus.OPEN)
    overlap = models.PositiveSmallIntegerField(default=1, help_text="distinct annotators per task")
    gold_rate = models.FloatField(default=0.0, help_text="share of claims served from gold tasks")
    lease_seconds = models.PositiveIntegerField(default=900)
    too_fast_seconds = models.FloatField(default=4.0, help_text="submissions faster than this are flagged")
    test_size = models.PositiveIntegerField(default=1000, help_text="held-out examples fixed at close")
    created_at = models.DateTimeField(auto_now_add=True)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at", "id"]
        verbose_name_plural = "batches"
        constraints = [
            models.CheckConstraint(condition=Q(overlap__gte=1), name="batch_overlap_positive"),
            models.CheckConstraint(condition=Q(gold_rate__gte=0) & Q(gold_rate__lte=1), name="batch_gold_rate_0_1"),
            models.CheckConstraint(condition=Q(lease_seconds__gte=10), name="batch_lease_at_least_10s"),
            models.CheckConstraint(condition=Q(status__in=BatchStatus.values), name="batch_status_valid"),
            models.CheckConstraint(
                condition=Q(status="open", closed_at__isnull=True) | Q(status="closed", closed_at__isnull=False),
                name="batch_closed_at_iff_closed",
            ),
        ]

    def __str__(self) -> str:
        return self.name


class TaskStatus(models.TextChoices):
    AWAITING_RESPONSES = "awaiting_responses"  # a continued dialogue waits for a model worker
    OPEN = "open"
    COMPLETE = "complete"


class ComparisonTask(models.Model):
    """A dialogue context and two responses to compare, in a batch."""

    batch = models.ForeignKey(Batch, on_delete=models.PROTECT, related_name="tasks")
    dialogue = models.ForeignKey("Dialogue", on_delete=models.PROTECT, related_name="tasks")
    context_length = models.PositiveIntegerField(help_text="turns of the dialogue shown as context")
    domain = models.CharField(max_length=16, choices=DOMAIN_CHOICES)
    response_a = models.ForeignKey("Response", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    response_b = models.ForeignKey("Response", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=24, choices=TaskStatus.choices, default=TaskStatus.OPEN)
    required_annotations = models.PositiveSmallIntegerField(default=1)
    annotation_count = models.PositiveIntegerField(default=0)
    is_gold = models.BooleanField(default=False)
    gold_choice = models.CharField(max_length=1, choices=[(c.value, c.name) for c in Choice], blank=True, default="")
    split = models.CharField(max_length=8, choices=Split.choices, blank=True, default="")
    # The annotation that opened this task by continuing a dialogue, if any.
    opened_by = models.ForeignKey(
        "Annotation", null=True, blank=True, on_delete=models.SET_NULL, related_name="opened_tasks"
    )
    # SHA-256 of what was imported (context, both responses and their policies, domain, gold answer): the
    # same comparison imported into the same batch again is recognised and not stored twice. Empty for
    # tasks opened by continuing a dialogue.
    content_key = models.CharField(max_length=64, blank=True, default="", editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            models.Index(fields=["batch", "status"]),
            models.Index(fields=["is_gold", "domain", "batch"], condition=Q(is_gold=True), name="task_gold_idx"),
        ]
        constraints = [
            # A comparison is stored once per batch (see annotation.services.imports.comparison_content_key).
            models.UniqueConstraint(
                fields=["batch", "content_key"], condition=~Q(content_key=""), name="task_content_unique_in_batch"
            ),
            models.CheckConstraint(condition=Q(status__in=TaskStatus.values), name="task_status_valid"),
            models.CheckConstraint(condition=Q(domain__in=["helpfulness", "safety"]), name="task_domain_valid"),
            models.CheckConstraint(condition=Q(required_annotations__gte=1), name="task_overlap_positive"),
            # Never more annotations than the overlap asks for (gold tasks are answered by everyone).
            models.CheckConstraint(
                condition=Q(is_gold=True) | Q(annotation_count__lte=F("required_annotations")),
                name="task_annotations_within_overlap",
            ),
            models.CheckConstraint(
                condition=Q(status="awaiting_responses", response_a__isnull=True, response_b__isnull=True)
                | (~Q(status="awaiting_responses") & Q(response_a__isnull=False, response_b__isnull=False)),
                name="task_responses_present_unless_awaiting",
            ),
            models.CheckConstraint(condition=~Q(response_a=F("response_b")), name="task_two_distinct_responses"),
            models.CheckConstraint(
                condition=Q(is_gold=True, gold_choice__in=["a", "b"]) | Q(is_gold=False, gold_choice=""),
                name="task_gold_choice_iff_gold",
            ),
            models.CheckConstraint(condition=Q(split__in=["", "train", "test"]), name="task_split_valid"),
            models.CheckConstraint(
                condition=models.lookups.Exact(models.functions.Mod(F("context_length"), 2), 1),
                name="task_context_ends_with_user_turn",
            ),
        ]

    def __str__(self) -> str:
        return f"Task {self.pk} ({self.batch_id})"


class SlotState(models.TextChoices):
    FREE = "free"
    LEASED = "leased"
    FILLED = "filled"


class TaskSlot(models.Model):
    """One of a task's `required_annotations` places; claims lock slots with SKIP LOCKED.

    Slots are what make overlap exact under concurrency: a claim takes a free (or expired) slot row
    under SELECT ... FOR UPDATE SKIP LOCKED, and a submit fills it. Gold tasks have no slots.
    """

    task = models.ForeignKey(ComparisonTask, on_delete=models.CASCADE, related_name="slots")
    index = models.PositiveSmallIntegerField()
    state = models.CharField(max_length=8, choices=SlotState.choices, default=SlotState.FREE)
    # Denormalised from the task and batch so that the claim is one index scan.
    domain = models.CharField(max_length=16, choices=DOMAIN_CHOICES)
    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="+")
    assignment = models.OneToOneField(
        "Assignment", null=True, blank=True, on_delete=models.SET_NULL, related_name="slot"
    )
    lease_expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["task", "index"], name="slot_task_index_unique"),
            models.CheckConstraint(condition=Q(state__in=SlotState.values), name="slot_state_valid"),
            models.CheckConstraint(
                condition=Q(state="free", assignment__isnull=True)
                | (~Q(state="free") & Q(assignment__isnull=False)),
                name="slot_assignment_iff_taken",
            ),
        ]
        indexes = [
            # The claim's scan: open slots in batch order, then task order.
            models.Index(
                fields=["batch", "domain", "task", "index"],
                condition=~Q(state="filled"),
                name="slot_claim_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"Slot {self.task_id}/{self.index} {self.state}"


class AssignmentStatus(models.TextChoices):
    LEASED = "leased"
    SUBMITTED = "submitted"
    SKIPPED = "skipped"
    RELEASED = "released"
    EXPIRED = "expired"


class Assignment(models.Model):
    """A task served to an annotator. One row per (task, annotator): a task is never served twice."""

    task = models.ForeignKey(ComparisonTask, on_delete=models.CASCADE, related_name="assignments")
    annotator = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="assignments")
    status = models.CharField(max_length=12, choices=AssignmentStatus.choices, default=AssignmentStatus.LEASED)
    leased_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["task", "annotator"], name="assignment_once_per_annotator"),
            # At most one live lease per annotator: a repeated claim returns it.
            models.UniqueConstraint(
                fields=["annotator"], condition=Q(status="leased"), name="assignment_one_lease_per_annotator"
            ),
            models.CheckConstraint(condition=Q(status__in=AssignmentStatus.values), name="assignment_status_valid"),
            models.CheckConstraint(condition=Q(expires_at__gt=F("leased_at")), name="assignment_expiry_after_lease"),
        ]

    def __str__(self) -> str:
        return f"Assignment {self.task_id} -> {self.annotator_id} ({self.status})"


class Annotation(models.Model):
    """One annotator's judgement of one comparison."""

    task = models.ForeignKey(ComparisonTask, on_delete=models.PROTECT, related_name="annotations")
    annotator = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="annotations")
    assignment = models.OneToOneField(Assignment, on_delete=models.PROTECT, related_name="annotation")
    choice = models.CharField(max_length=1, choices=[(c.value, c.name) for c in Choice])
    # Blank only for imported data that carries no strength (HH-RLHF); the UI and API require one.
    strength = models.CharField(max_length=24, choices=[(s.value, s.name) for s in Strength], blank=True)
    safety_label = models.CharField(
        max_length=32, choices=[(s.value, s.name) for s in SafetyLabel], blank=True, default=""
    )
    note = models.TextField(blank=True, default="")
    time_on_task_ms = models.PositiveIntegerField(null=True, blank=True)
    too_fast = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["task", "annotator"], name="annotation_once_per_annotator"),
            models.CheckConstraint(condition=Q(choice__in=[c.value for c in Choice]), name="annotation_choice_valid"),
            models.CheckConstraint(
                condition=Q(strength__in=["", *[s.value for s in Strength]]), name="annotation_strength_valid"
            ),
            models.CheckConstraint(
                condition=Q(safety_label__in=["", *[s.value for s in SafetyLabel]]), name="annotation_safety_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"Annotation {self.pk}: {self.choice} {self.strength}"
