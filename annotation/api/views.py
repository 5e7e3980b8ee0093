"""Thin API views: parse input, call one service or selector, shape the output."""

from datetime import datetime, time

from django.db import transaction
from django.db.models import Count, Q
from django.http import StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.utils import timezone
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.decorators import action
from rest_framework.exceptions import Throttled
from rest_framework.response import Response
from rest_framework.views import APIView

from annotation.evaluation_results import campaign_results, evaluation_payload
from annotation.models import (
    Annotation,
    AnnotatorProfile,
    Batch,
    BatchStatus,
    Campaign,
    ComparisonTask,
    PolicyVersion,
    Prompt,
    RewardModelVersion,
    Role,
    TrainingRun,
)
from annotation.selectors import (
    annotator_quality,
    assignment_payload,
    batch_stats,
    task_context,
    work_backlogs,
)
from annotation.services.assignment import annotation_submit, assignment_claim_next, assignment_give_back
from annotation.services.batches import batch_close
from annotation.services.campaigns import (
    campaign_close,
    campaign_create,
    evaluation_claim_next,
    evaluation_submit,
)
from annotation.services.dialogues import prompt_create, task_attach_responses
from annotation.services.errors import InvalidInput, NotFound
from annotation.services.exports import FORMATS, ExportFilters, comparisons_export_lines
from annotation.services.imports import ComparisonRecord, ResponseRecord, comparisons_store, policies_resolve
from annotation.services.policies import policy_make_current, policy_register
from annotation.services.runs import run_cancel, run_create
from annotation.throttling import ExactScopedRateThrottle, login_attempt_begin, login_attempt_succeeded

from . import serializers as s
from .permissions import IsResearcher, IsReviewer, ReadReviewerWriteResearcher, role_of


class TokenObtainView(ObtainAuthToken):
    """A token for scripts. Failed attempts are limited per user name and per client address; past the limit
    every attempt is refused (429) until the window ends, the right password included."""

    def post(self, request, *args, **kwargs):
        username = request.data.get("username") if hasattr(request.data, "get") else None
        attempt = login_attempt_begin(request, username if isinstance(username, str) else "")
        if attempt.refused_for is not None:
            raise Throttled(wait=attempt.refused_for, detail="too many failed log-ins for this user name or address")
        response = super().post(request, *args, **kwargs)  # a wrong password raises (400)
        login_attempt_succeeded(attempt)
        return response


class TaskNextView(APIView):
    throttle_classes = [ExactScopedRateThrottle]
    throttle_scope = "claim"

    @extend_schema(
        request=None,
        responses={200: s.AssignedTaskSerializer, 204: OpenApiResponse(description="no task available for you")},
        summary="Claim the next comparison (or get the one you already hold)",
    )
    def post(self, request):
        assignment = assignment_claim_next(user=request.user)
        if assignment is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        # The payload is built by the selector in the serializer's shape (the schema documents it).
        return Response(assignment_payload(assignment))


class TaskSubmitView(APIView):
    throttle_classes = [ExactScopedRateThrottle]
    throttle_scope = "submit"

    @extend_schema(request=s.SubmitInSerializer, responses={200: s.SubmitOutSerializer, 201: s.SubmitOutSerializer})
    def post(self, request, task_id: int):
        data = s.SubmitInSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        result = annotation_submit(user=request.user, task_id=task_id, **data.validated_data)
        out = {
            "annotation": result.annotation,
            "created": result.created,
            "continuation_task_id": result.continuation.id if result.continuation else None,
        }
        return Response(
            s.SubmitOutSerializer(out).data, status=status.HTTP_201_CREATED if result.created else status.HTTP_200_OK
        )


_given_back = inline_serializer("GivenBack", {"task_id": serializers.IntegerField(), "status": serializers.CharField()})


class TaskSkipView(APIView):
    skip = True

    @extend_schema(request=None, responses={200: _given_back})
    def post(self, request, task_id: int):
        assignment = assignment_give_back(user=request.user, task_id=task_id, skip=self.skip)
        return Response({"task_id": task_id, "status": assignment.status})


class TaskReleaseView(TaskSkipView):
    skip = False


class TaskResponsesView(APIView):
    """A model worker attaches the two responses a waiting comparison needs."""

    permission_classes = [IsResearcher]

    @extend_schema(request=s.AttachResponsesSerializer, responses={200: inline_serializer(
        "AttachedTask", {"task_id": serializers.IntegerField(), "status": serializers.CharField()})})  # fmt: skip
    def post(self, request, task_id: int):
        data = s.AttachResponsesSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        responses = data.validated_data["responses"]
        with transaction.atomic():
            policies = policies_resolve({r["policy_version"] for r in responses}, create_external=False)
            task = task_attach_responses(task_id=task_id, responses=responses, policies=policies)
        return Response({"task_id": task.id, "status": task.status})


class WaitingTaskSerializer(serializers.Serializer):
    task_id = serializers.IntegerField(source="id")
    batch = serializers.CharField(source="batch.name")
    domain = serializers.CharField()
    dialogue = s.MessageSerializer(many=True, source="context")


class WaitingTasksView(APIView):
    """Comparisons waiting for model responses (new prompts, continued dialogues), oldest first."""

    permission_classes = [IsResearcher]

    @extend_schema(
        parameters=[OpenApiParameter("limit", int, description="at most this many (default 100, max 1000)")],
        responses={200: WaitingTaskSerializer(many=True)},
    )
    def get(self, request):
        try:
            limit = min(max(int(request.query_params.get("limit", 100)), 1), 1000)
        except ValueError:
            raise InvalidInput("limit must be an integer", field="limit") from None
        tasks = list(
            ComparisonTask.objects.filter(status="awaiting_responses", batch__status=BatchStatus.OPEN)
            .select_related("batch")
            .order_by("id")[:limit]
        )
        for task in tasks:
            task.context = task_context(task)
        return Response(WaitingTaskSerializer(tasks, many=True).data)


class PromptViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Prompts: annotators see their own, researchers all. Writing one opens a comparison."""

    queryset = Prompt.objects.none()  # per user, see get_queryset
    serializer_class = s.PromptSerializer
    filterset_fields = ["domain", "risk_category", "source"]

    def get_queryset(self):
        qs = Prompt.objects.order_by("-id")
        if role_of(self.request.user) in (Role.RESEARCHER, Role.ADMIN, Role.REVIEWER):
            return qs
        return qs.filter(author=self.request.user)

    @extend_schema(request=s.PromptInSerializer, responses={201: s.PromptCreatedSerializer})
    def create(self, request):
        data = s.PromptInSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        batch = None
        if v.get("batch"):
            batch = Batch.objects.filter(name=v["batch"]).first()
            if batch is None:
                raise NotFound(f"batch {v['batch']!r} does not exist")
        task = prompt_create(
            author=request.user, text=v["text"], domain=v["domain"], risk_category=v["risk_category"], batch=batch
        )
        return Response(
            s.PromptCreatedSerializer({"prompt": task.dialogue.prompt, "task_id": task.id}).data,
            status=status.HTTP_201_CREATED,
        )


class BatchViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet):
    queryset = Batch.objects.order_by("created_at", "id")
    serializer_class = s.BatchSerializer
    permission_classes = [ReadReviewerWriteResearcher]
    filterset_fields = ["status"]

    @extend_schema(responses={200: OpenApiTypes.OBJECT})
    def stats(self, request, pk=None):
        return Response(batch_stats(self.get_object()))

    @extend_schema(request=None, responses={200: s.BatchSerializer})
    def close(self, request, pk=None):
        return Response(s.BatchSerializer(batch_close(batch_id=self.get_object().pk)).data)


class ImportView(APIView):
    """Bulk import of model responses: two responses per prompt or dialogue; comparison tasks come back, one
    per item in order. An item already in the batch gets its existing task (201 when anything was created,
    200 when every item was there already)."""

    permission_classes = [IsResearcher]

    @extend_schema(request=s.ImportSerializer, responses={201: s.ImportOutSerializer, 200: s.ImportOutSerializer})
    def post(self, request):
        data = s.ImportSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        batch = Batch.objects.filter(name=data.validated_data["batch"]).first()
        if batch is None:
            raise NotFound(f"batch {data.validated_data['batch']!r} does not exist", field="batch")
        records = []
        for i, item in enumerate(data.validated_data["items"]):
            if item.get("prompt"):
                turns = (("user", item["prompt"]),)
            else:
                turns = tuple((m["role"], m["content"]) for m in item["dialogue"])
            a, b = (ResponseRecord(r["text"], r["policy_version"], r.get("sampling") or {}) for r in item["responses"])
            records.append(
                ComparisonRecord(
                    turns=turns,
                    response_a=a,
                    response_b=b,
                    domain=item["domain"],
                    risk_category=item["risk_category"],
                    gold_choice=item["gold_choice"],
                    origin=f"items[{i}]",
                )
            )
        stored = comparisons_store(batch=batch, records=records, author=request.user)
        return Response(
            {"batch": batch.name, "task_ids": [t.id for t in stored.tasks], "created": stored.created,
             "existing": stored.existing},
            # Posting the same items again (a retry after a lost response) creates nothing and says so.
            status=status.HTTP_201_CREATED if stored.created else status.HTTP_200_OK,
        )  # fmt: skip


def _bool_param(request, name: str, default: bool) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise InvalidInput(f"{name} must be true or false, got {raw!r}", field=name)


def _date_param(request, name: str):
    from django.utils.dateparse import parse_date, parse_datetime

    raw = request.query_params.get(name)
    if not raw:
        return None
    try:
        value = parse_datetime(raw) or parse_date(raw)
    except ValueError:
        value = None
    if value is None:
        raise InvalidInput(f"{name} must be an ISO date or datetime, got {raw!r}", field=name)
    if not hasattr(value, "hour"):
        from datetime import datetime, time

        from django.utils import timezone

        value = timezone.make_aware(datetime.combine(value, time.min))
    return value


class ExportView(APIView):
    permission_classes = [IsResearcher]

    @extend_schema(
        parameters=[
            OpenApiParameter("format", str, enum=list(FORMATS), description="native (default), trl or hh-rlhf"),
            OpenApiParameter("batch", str),
            OpenApiParameter("domain", str, enum=["helpfulness", "safety"]),
            OpenApiParameter("split", str, enum=["train", "test"]),
            OpenApiParameter("created_after", str, description="ISO date or datetime"),
            OpenApiParameter("created_before", str, description="ISO date or datetime"),
            OpenApiParameter("include_gold", bool, description="default false"),
            OpenApiParameter("aggregate", bool, description="one row per task: the reviewer's adjudication where there is one, else the majority vote"),
            OpenApiParameter("margin", str, enum=["none", "small", "large"], description="Table 27 margins (trl)"),
        ],
        responses={(200, "application/jsonl"): OpenApiTypes.STR},
    )
    def get(self, request):
        p = request.query_params
        domain, split = p.get("domain"), p.get("split")
        if domain and domain not in ("helpfulness", "safety"):
            raise InvalidInput("domain must be helpfulness or safety", field="domain")
        if split and split not in ("train", "test"):
            raise InvalidInput("split must be train or test", field="split")
        filters_ = ExportFilters(
            batch=p.get("batch") or None,
            domain=domain or None,
            split=split or None,
            created_after=_date_param(request, "created_after"),
            created_before=_date_param(request, "created_before"),
            include_gold=_bool_param(request, "include_gold", False),
        )
        lines = comparisons_export_lines(
            filters=filters_,
            fmt=p.get("format", "native"),
            margin=p.get("margin", "small"),
            aggregate=_bool_param(request, "aggregate", False),
        )
        first = next(lines, None)  # validate parameters before the 200 goes out

        def stream():
            # ~64 KiB writes: one socket write per line would cost a system call per row.
            buffer, size = [first] if first is not None else [], 0
            for line in lines:
                buffer.append(line)
                size += len(line)
                if size >= 65536:
                    yield "".join(buffer)
                    buffer, size = [], 0
            if buffer:
                yield "".join(buffer)

        response = StreamingHttpResponse(stream(), content_type="application/jsonl; charset=utf-8")
        response["Content-Disposition"] = 'attachment; filename="comparisons.jsonl"'
        return response


class AnnotatorQualityView(APIView):
    permission_classes = [IsReviewer]

    @extend_schema(parameters=[OpenApiParameter("batch", str)], responses={200: s.AnnotatorQualitySerializer(many=True)})
    def get(self, request):
        batch = None
        if name := request.query_params.get("batch"):
            batch = get_object_or_404(Batch, name=name)
        return Response(annotator_quality(batch=batch))


class MyCountsSerializer(serializers.Serializer):
    username = serializers.CharField()
    role = serializers.CharField()
    domains = serializers.ListField(child=serializers.CharField())
    annotations = serializers.IntegerField()
    annotations_today = serializers.IntegerField()


class MyCountsView(APIView):
    """Your own role and counts: the figures an annotator may see (nothing of other annotators or gold)."""

    @extend_schema(responses={200: MyCountsSerializer})
    def get(self, request):
        profile = AnnotatorProfile.objects.filter(user=request.user).first() or AnnotatorProfile(user=request.user)
        midnight = timezone.make_aware(datetime.combine(timezone.localdate(), time.min))
        counts = Annotation.objects.filter(annotator=request.user).aggregate(
            annotations=Count("id"), annotations_today=Count("id", filter=Q(created_at__gte=midnight))
        )
        return Response(MyCountsSerializer(
            {"username": request.user.get_username(), "role": role_of(request.user), "domains": profile.domains,
             **counts}
        ).data)  # fmt: skip


class AnnotationFilter(filters.FilterSet):
    class Meta:
        model = Annotation
        fields = ["task", "choice", "strength"]


class AnnotationViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Your own annotations. Blind: nobody sees another annotator's labels here."""

    queryset = Annotation.objects.none()  # per user, see get_queryset
    serializer_class = s.AnnotationSerializer
    filterset_class = AnnotationFilter

    def get_queryset(self):
        return Annotation.objects.filter(annotator=self.request.user).order_by("-id")


class PolicyVersionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Policy versions. Researchers register a checkpoint (POST) and make a version current (POST .../current/);
    a version a stage produced becomes current only after its evaluation."""

    queryset = PolicyVersion.objects.all()
    serializer_class = s.PolicyVersionSerializer
    permission_classes = [ReadReviewerWriteResearcher]
    filterset_fields = ["kind", "is_current"]

    @extend_schema(request=s.PolicyRegisterSerializer, responses={201: s.PolicyVersionSerializer})
    def create(self, request):
        data = s.PolicyRegisterSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        parent = None
        if v.get("parent"):
            parent = PolicyVersion.objects.filter(name=v["parent"]).first()
            if parent is None:
                raise InvalidInput(f"no policy version named {v['parent']!r}", field="parent")
        version = policy_register(name=v["name"], checkpoint=v["checkpoint_uri"], tokenizer=v["tokenizer_uri"] or None,
                                  kind=v["kind"], parent=parent, prompt_format=v["prompt_format"],
                                  current=v["is_current"])  # fmt: skip
        return Response(s.PolicyVersionSerializer(version).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={200: s.PolicyVersionSerializer})
    @action(detail=True, methods=["post"])
    def current(self, request, pk=None):
        return Response(s.PolicyVersionSerializer(policy_make_current(version=self.get_object())).data)


class RewardModelVersionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                                viewsets.GenericViewSet):
    """Reward models: registered by reward-model runs, or by a researcher (POST) for one trained elsewhere."""

    queryset = RewardModelVersion.objects.all()
    serializer_class = s.RewardModelVersionSerializer
    permission_classes = [ReadReviewerWriteResearcher]
    filterset_fields = ["kind"]


class TrainingRunViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Runs of every kind. Researchers and admins start one (POST: kind and params, checked up front; a worker on
    the gpu queue takes it) and cancel one (POST .../cancel/: a queued run at once, a running one at its next
    step)."""

    queryset = TrainingRun.objects.all()
    serializer_class = s.TrainingRunSerializer
    permission_classes = [ReadReviewerWriteResearcher]
    filterset_fields = ["kind", "status", "parent"]

    @extend_schema(request=s.TrainingRunCreateSerializer, responses={201: s.TrainingRunSerializer})
    def create(self, request):
        data = s.TrainingRunCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        run = run_create(kind=data.validated_data["kind"], params=data.validated_data["params"], user=request.user)
        return Response(s.TrainingRunSerializer(run).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={200: s.TrainingRunSerializer})
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        return Response(s.TrainingRunSerializer(run_cancel(run_id=self.get_object().pk)).data)


class CampaignViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Human evaluation campaigns: researchers create one from prompts and one or two policy versions (the model
    worker samples the responses, or the prompts carry them), close it, and read its results."""

    queryset = Campaign.objects.select_related("policy", "baseline")
    serializer_class = s.CampaignSerializer
    permission_classes = [ReadReviewerWriteResearcher]
    filterset_fields = ["kind", "status"]

    @extend_schema(request=s.CampaignCreateSerializer, responses={201: s.CampaignSerializer})
    def create(self, request):
        data = s.CampaignCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        campaign = campaign_create(name=v["name"], kind=v["kind"], policy=v["policy"], baseline=v.get("baseline"),
                                   prompts=v["prompts"], overlap=v["overlap"], user=request.user,
                                   generation=v["generation"])  # fmt: skip
        return Response(s.CampaignSerializer(campaign).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={200: s.CampaignSerializer})
    @action(detail=True, methods=["post"])
    def close(self, request, pk=None):
        return Response(s.CampaignSerializer(campaign_close(campaign_id=self.get_object().pk)).data)

    @extend_schema(responses={200: OpenApiTypes.OBJECT})
    @action(detail=True, methods=["get"])
    def results(self, request, pk=None):
        return Response(campaign_results(self.get_object()))


class BacklogsView(APIView):
    """Work waiting, by kind: comparisons awaiting responses, open places per skill, the review queue, evaluation
    items (what the dashboard's cockpit shows)."""

    permission_classes = [IsReviewer]

    @extend_schema(responses={200: OpenApiTypes.OBJECT})
    def get(self, request):
        return Response(work_backlogs())


class EvaluationNextView(APIView):
    """The next item to rate (blind: no policy names; a pairwise item shows `left` and `right`)."""

    throttle_classes = [ExactScopedRateThrottle]
    throttle_scope = "claim"

    @extend_schema(request=None, responses={200: OpenApiTypes.OBJECT, 204: OpenApiResponse(description="nothing to rate")})
    def post(self, request):
        assignment = evaluation_claim_next(user=request.user)
        if assignment is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        return Response(evaluation_payload(assignment))


class EvaluationSubmitView(APIView):
    @extend_schema(request=s.EvaluationSubmitSerializer, responses={201: OpenApiTypes.OBJECT})
    def post(self, request, item_id: int):
        data = s.EvaluationSubmitSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        rating = evaluation_submit(user=request.user, item_id=item_id, score=v["score"], note=v["note"],
                                   time_on_task_ms=v.get("time_on_task_ms"))  # fmt: skip
        return Response({"item_id": item_id, "rating_id": rating.pk, "scale": rating.scale}, status=status.HTTP_201_CREATED)
