from rest_framework import serializers

from annotation.models import (
    Annotation,
    Batch,
    Campaign,
    Domain,
    PolicyVersion,
    Prompt,
    RewardModelVersion,
    RiskCategory,
    TrainingRun,
)
from annotation.scales import Choice, SafetyLabel, Strength
from annotation.services.errors import InvalidInput
from annotation.validation import MAX_MESSAGE_CHARS, MAX_NOTE_CHARS, check_overlap

from .fields import CheckedModelSerializer, ChoiceTextField, JSONObjectField, TextField, TimeOnTaskField

DOMAINS = Domain.choices


class MessageSerializer(serializers.Serializer):
    role = ChoiceTextField(choices=["user", "assistant"])
    content = TextField(trim_whitespace=False, max_length=200_000)


class ResponseInSerializer(serializers.Serializer):
    # An empty reply is real data (a model that stops at once; HH-RLHF has such answers).
    text = TextField(max_length=200_000, allow_blank=True, trim_whitespace=False)
    policy_version = TextField(max_length=100)
    sampling = JSONObjectField(required=False, default=dict)


class ShownResponseSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    text = serializers.CharField()


class AssignedTaskSerializer(serializers.Serializer):
    """What an annotator sees: no policy names, no gold flag, nobody else's labels."""

    task_id = serializers.IntegerField()
    batch = serializers.CharField()
    domain = serializers.CharField()
    risk_category = serializers.CharField(allow_blank=True)
    dialogue = MessageSerializer(many=True)
    response_a = ShownResponseSerializer()
    response_b = ShownResponseSerializer()
    leased_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField()


class SubmitInSerializer(serializers.Serializer):
    choice = ChoiceTextField(choices=[c.value for c in Choice])
    strength = ChoiceTextField(choices=[s.value for s in Strength])
    safety_label = ChoiceTextField(
        choices=["", *[s.value for s in SafetyLabel]], required=False, default="", help_text="safety tasks only"
    )
    note = TextField(required=False, allow_blank=True, default="", max_length=MAX_NOTE_CHARS, trim_whitespace=False)
    time_on_task_ms = TimeOnTaskField(required=False, allow_null=True, default=None)
    continue_with = TextField(
        required=False, allow_blank=True, default="", max_length=MAX_MESSAGE_CHARS,
        help_text="a next user message: continues the dialogue with the chosen reply",
    )  # fmt: skip


class AnnotationSerializer(serializers.ModelSerializer):
    class Meta:
        model = Annotation
        fields = ["id", "task", "choice", "strength", "safety_label", "note", "time_on_task_ms", "too_fast", "created_at"]
        read_only_fields = fields


class SubmitOutSerializer(serializers.Serializer):
    annotation = AnnotationSerializer()
    created = serializers.BooleanField()
    continuation_task_id = serializers.IntegerField(allow_null=True)


class PromptInSerializer(serializers.Serializer):
    text = TextField(max_length=50_000)
    domain = ChoiceTextField(choices=DOMAINS)
    risk_category = ChoiceTextField(choices=[("", "None"), *RiskCategory.choices], required=False, default="")
    batch = TextField(required=False, max_length=100, help_text="batch name; default: the newest open batch")


class PromptSerializer(serializers.ModelSerializer):
    risk_category = serializers.ChoiceField(choices=[("", "None"), *RiskCategory.choices], read_only=True)

    class Meta:
        model = Prompt
        fields = ["id", "text", "domain", "risk_category", "source", "author", "created_at"]
        read_only_fields = fields


class PromptCreatedSerializer(serializers.Serializer):
    prompt = PromptSerializer()
    task_id = serializers.IntegerField()


class BatchSerializer(CheckedModelSerializer):
    class Meta:
        model = Batch
        fields = [
            "id", "name", "status", "overlap", "gold_rate", "lease_seconds", "too_fast_seconds", "test_size",
            "created_at", "closed_at",
        ]  # fmt: skip
        read_only_fields = ["id", "status", "created_at", "closed_at"]

    def validate_overlap(self, value):
        try:
            return check_overlap(value)
        except InvalidInput as e:
            raise serializers.ValidationError(e.message) from None

    def validate_gold_rate(self, value):
        if not 0 <= value <= 1:
            raise serializers.ValidationError("gold_rate must be between 0 and 1")
        return value

    def validate_lease_seconds(self, value):
        if value < 10:
            raise serializers.ValidationError("lease_seconds must be at least 10")
        return value

    def validate_too_fast_seconds(self, value):
        if value < 0 or value > 86_400:
            raise serializers.ValidationError("too_fast_seconds must be between 0 and 86400")
        return value


class AttachResponsesSerializer(serializers.Serializer):
    responses = ResponseInSerializer(many=True, min_length=2, max_length=2)


class ImportItemSerializer(serializers.Serializer):
    prompt = TextField(required=False, max_length=50_000, help_text="a single-turn context")
    dialogue = MessageSerializer(many=True, required=False, help_text="a multi-turn context ending with a user turn")
    domain = ChoiceTextField(choices=DOMAINS)
    risk_category = ChoiceTextField(choices=[("", "None"), *RiskCategory.choices], required=False, default="")
    responses = ResponseInSerializer(many=True, min_length=2, max_length=2)
    gold_choice = ChoiceTextField(choices=["", "a", "b"], required=False, default="")

    def validate(self, attrs):
        if bool(attrs.get("prompt")) == bool(attrs.get("dialogue")):
            raise serializers.ValidationError("give exactly one of 'prompt' or 'dialogue'")
        return attrs


class ImportSerializer(serializers.Serializer):
    batch = TextField(max_length=100)
    items = ImportItemSerializer(many=True, min_length=1, max_length=5000)


class ImportOutSerializer(serializers.Serializer):
    batch = serializers.CharField()
    task_ids = serializers.ListField(child=serializers.IntegerField(), help_text="the task of each item, in order")
    created = serializers.IntegerField(help_text="items stored as new tasks")
    existing = serializers.IntegerField(help_text="items the batch held already (their existing task is given)")


class PolicyVersionSerializer(CheckedModelSerializer):
    class Meta:
        model = PolicyVersion
        fields = ["id", "name", "kind", "parent", "checkpoint_uri", "tokenizer_uri", "metrics", "is_current", "created_at"]
        read_only_fields = fields


class PolicyRegisterSerializer(serializers.Serializer):
    """Register a checkpoint directory on the shared volume (Meta or Hugging Face layout)."""

    name = TextField(max_length=100)
    checkpoint_uri = TextField(max_length=500)
    tokenizer_uri = TextField(max_length=500, required=False, allow_blank=True, default="")
    kind = ChoiceTextField(choices=["pretrained", "sft", "rejection_sampling", "ppo", "distillation"], default="pretrained")
    parent = TextField(max_length=100, required=False, help_text="the parent version's name")
    prompt_format = ChoiceTextField(choices=["chat", "plain"], default="chat")
    is_current = serializers.BooleanField(default=False)


class RewardModelVersionSerializer(CheckedModelSerializer):
    class Meta:
        model = RewardModelVersion
        fields = ["id", "name", "kind", "parent", "checkpoint_uri", "batches", "metrics", "created_at"]
        read_only_fields = ["id", "created_at"]


class TrainingRunSerializer(CheckedModelSerializer):
    class Meta:
        model = TrainingRun
        fields = [
            "id", "kind", "params", "status", "progress", "metrics", "error", "created_at", "started_at",
            "finished_at", "heartbeat_at", "attempts", "parent", "policy_version", "reward_model_version",
        ]  # fmt: skip
        read_only_fields = [f for f in fields if f not in ("kind", "params")]


class TrainingRunCreateSerializer(serializers.Serializer):
    """A run to start: its kind and parameters (checked against the kind's parameter table)."""

    kind = ChoiceTextField(choices=["reward_model", "sft", "rejection_sampling", "ppo", "distillation", "generation",
                                    "evaluation", "round"])  # fmt: skip
    params = JSONObjectField(required=False, default=dict)


class AnnotatorQualitySerializer(serializers.Serializer):
    annotator_id = serializers.IntegerField()
    username = serializers.CharField()
    annotations = serializers.IntegerField()
    gold_answered = serializers.IntegerField()
    gold_accuracy = serializers.FloatField(allow_null=True)
    too_fast_rate = serializers.FloatField()
    mean_time_on_task_ms = serializers.FloatField(allow_null=True)


class CampaignSerializer(CheckedModelSerializer):
    policy = serializers.CharField(source="policy.name")
    baseline = serializers.CharField(source="baseline.name", allow_null=True)

    class Meta:
        model = Campaign
        fields = ["id", "name", "kind", "policy", "baseline", "status", "overlap", "created_at", "closed_at"]
        read_only_fields = fields


class CampaignPromptSerializer(serializers.Serializer):
    """A prompts-file row: `prompt` or `dialogue`, optional domain and risk category, and (imported campaigns)
    the responses."""

    prompt = TextField(max_length=MAX_MESSAGE_CHARS, required=False)
    dialogue = MessageSerializer(many=True, required=False)
    domain = ChoiceTextField(choices=["helpfulness", "safety"], default="helpfulness")
    risk_category = ChoiceTextField(choices=[c for c, _ in RiskCategory.choices], required=False)
    response = TextField(max_length=200_000, required=False, allow_blank=False, trim_whitespace=False)
    baseline_response = TextField(max_length=200_000, required=False, allow_blank=False, trim_whitespace=False)

    def validate(self, attrs):
        if ("prompt" in attrs) == ("dialogue" in attrs):
            raise serializers.ValidationError("give prompt or dialogue")
        if "prompt" in attrs:
            attrs["dialogue"] = [{"role": "user", "content": attrs.pop("prompt")}]
        return attrs


class CampaignCreateSerializer(serializers.Serializer):
    name = TextField(max_length=100)
    kind = ChoiceTextField(choices=["rating", "pairwise"])
    policy = TextField(max_length=100, help_text="the version under evaluation")
    baseline = TextField(max_length=100, required=False, help_text="pairwise: the version it is compared with")
    overlap = serializers.IntegerField(min_value=1, max_value=20, default=3)
    prompts = CampaignPromptSerializer(many=True, allow_empty=False, max_length=20_000)
    generation = JSONObjectField(required=False, default=dict,
                                 help_text="model worker settings: temperatures, max_new_tokens, top_p, prompt_format")


class EvaluationSubmitSerializer(serializers.Serializer):
    score = serializers.IntegerField(min_value=1, max_value=7)
    note = TextField(max_length=MAX_NOTE_CHARS, required=False, allow_blank=True, default="")
    time_on_task_ms = TimeOnTaskField(required=False, allow_null=True)
