"""Evaluation campaigns: create one from prompts and policy versions, attach the responses, lease items to raters,
take their ratings. Blind as comparisons are: a rater sees no policy name, and the candidate's side is drawn per item.
"""

from __future__ import annotations

import random
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.db.models import Count, F, Q
from django.utils import timezone

from annotation.models import (
    Campaign,
    CampaignKind,
    CampaignStatus,
    EvaluationAssignment,
    EvaluationItem,
    EvaluationRating,
    ItemStatus,
    PolicyVersion,
    RatingScale,
    Response,
)
from annotation.models.evaluation import SCALE_POINTS
from annotation.validation import MAX_NOTE_CHARS, check_text

from .dialogues import dialogue_open
from .errors import Conflict, InvalidInput, LeaseExpired, NotFound
from .runs import NAME_RE, run_create


def prompt_rows(text: str, *, source: str = "prompts") -> list[dict]:
    """The rows of a prompts file's text (one JSON object a line: `prompt` or `dialogue`, optional `domain`,
    `risk_category`, `response`, `baseline_response`), `prompt` turned into a one-turn `dialogue`. Errors name
    source:line."""
    import json

    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{source}:{n}: not JSON ({e.msg})", field="prompts") from None
        if not isinstance(row, dict) or ("prompt" in row) == ("dialogue" in row):
            raise InvalidInput(f"{source}:{n}: give an object with prompt or dialogue", field="prompts")
        if "prompt" in row:
            if not isinstance(row["prompt"], str):
                raise InvalidInput(f"{source}:{n}: prompt must be a string", field="prompts")
            row["dialogue"] = [{"role": "user", "content": row.pop("prompt")}]
        if not isinstance(row["dialogue"], list) or not all(
                isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
                for t in row["dialogue"]):  # fmt: skip
            raise InvalidInput(f"{source}:{n}: dialogue must be a list of {{role, content}} turns", field="prompts")
        for key in ("response", "baseline_response"):
            if key in row and not isinstance(row[key], str):
                raise InvalidInput(f"{source}:{n}: {key} must be a string", field="prompts")
        rows.append(row)
    return rows


def _policy(name: str | None, field: str) -> PolicyVersion | None:
    if not name:
        return None
    version = PolicyVersion.objects.filter(name=name).first()
    if version is None:
        raise InvalidInput(f"{field}: no policy version named {name!r}", field=field)
    return version


def candidate_left(campaign: Campaign, item_id: int) -> bool:
    """Which side shows the candidate: drawn from the campaign's seed and the item, so it is fixed and recorded."""
    return random.Random(f"{campaign.seed}:{item_id}").random() < 0.5


@transaction.atomic
def campaign_create(*, name: str, kind: str, policy: str, baseline: str | None = None, prompts: list[dict],
                    overlap: int = 3, user=None, seed: int = 0, generation: dict | None = None) -> Campaign:
    """A campaign over `prompts` (rows of a prompts file). Rows that carry the responses (`response`, and for a
    pairwise campaign `baseline_response`) are attached at once; otherwise a generation run is queued for the model
    worker to sample them (its `generation` settings: temperature, max_new_tokens...). All or nothing."""
    if not NAME_RE.match(name or ""):
        raise InvalidInput("name: letters, digits, '.', '_' and '-' only", field="name")
    if Campaign.objects.filter(name=name).exists():
        raise Conflict(f"a campaign named {name!r} exists")
    if kind not in CampaignKind.values:
        raise InvalidInput(f"kind must be one of {CampaignKind.values}", field="kind")
    candidate = _policy(policy, "policy")
    if candidate is None:
        raise InvalidInput("policy: name the version under evaluation", field="policy")
    base = _policy(baseline, "baseline")
    if (kind == CampaignKind.PAIRWISE) != (base is not None):
        raise InvalidInput("a pairwise campaign needs a baseline; a rating campaign takes none", field="baseline")
    if base == candidate:
        raise InvalidInput("baseline: the candidate cannot be its own baseline", field="baseline")
    if not 1 <= overlap <= 20:
        raise InvalidInput("overlap must be between 1 and 20", field="overlap")
    if not prompts:
        raise InvalidInput("no prompts", field="prompts")
    with_responses = ["response" in p for p in prompts]
    if any(with_responses) and not all(with_responses):
        raise InvalidInput("either every prompt carries its response(s) or none does", field="prompts")
    campaign = Campaign.objects.create(name=name, kind=kind, policy=candidate, baseline=base, overlap=overlap,
                                       created_by=user, seed=seed)  # fmt: skip
    for i, row in enumerate(prompts):
        where = f"prompt {i + 1}"
        dialogue, context_length, domain, risk = dialogue_open(row, where=where, source=f"campaign:{name}")
        item = EvaluationItem.objects.create(campaign=campaign, dialogue=dialogue, context_length=context_length,
                                             domain=domain, risk_category=risk if domain == "safety" else "",
                                             required_ratings=overlap)  # fmt: skip
        if "response" in row:
            if kind == CampaignKind.PAIRWISE and "baseline_response" not in row:
                raise InvalidInput(f"{where}: baseline_response is missing", field="baseline_response")
            item_attach(item=item, response=row["response"], baseline_response=row.get("baseline_response"),
                        sampling={"source": "imported"})  # fmt: skip
    if not all(with_responses):
        run_create(kind="generation", params={"campaign": name, **(generation or {})}, user=user)
    return campaign


def item_attach(*, item: EvaluationItem, response: str, baseline_response: str | None,
                sampling: dict | None = None, baseline_sampling: dict | None = None) -> EvaluationItem:
    """The item's response(s) from the campaign's policies; the item opens. Call inside a transaction."""
    item = EvaluationItem.objects.select_for_update().select_related("campaign").get(pk=item.pk)  # the status now
    campaign = item.campaign
    if item.status != ItemStatus.AWAITING_RESPONSES:
        raise Conflict(f"item {item.pk} is {item.status}; it is not waiting for responses")
    for text, field in ((response, "response"), (baseline_response, "baseline_response")):
        if text is not None:
            check_text(text, field=field, max_length=200_000)
    if campaign.kind == CampaignKind.PAIRWISE and (baseline_response is None or baseline_response == response):
        raise InvalidInput("a pairwise item needs a baseline response different from the candidate's",
                           field="baseline_response")  # fmt: skip
    item.response = Response.objects.create(dialogue=item.dialogue, context_length=item.context_length, text=response,
                                            policy_version=campaign.policy, sampling=sampling or {})  # fmt: skip
    if campaign.kind == CampaignKind.PAIRWISE:
        item.baseline_response = Response.objects.create(
            dialogue=item.dialogue, context_length=item.context_length, text=baseline_response,
            policy_version=campaign.baseline, sampling=baseline_sampling or sampling or {},
        )  # fmt: skip
        item.candidate_left = candidate_left(campaign, item.pk)
    item.status = ItemStatus.OPEN
    item.save(update_fields=["response", "baseline_response", "candidate_left", "status"])
    return item


def scale_of(item: EvaluationItem) -> str:
    if item.campaign.kind == CampaignKind.PAIRWISE:
        return RatingScale.COMPARATIVE
    return RatingScale.SAFETY if item.domain == "safety" else RatingScale.HELPFULNESS


def _expire_leases(now) -> None:
    EvaluationAssignment.objects.filter(status="leased", expires_at__lte=now).update(status="expired")


@transaction.atomic
def evaluation_claim_next(*, user, now=None) -> EvaluationAssignment | None:
    """The rater's live lease, or a new one on the oldest open item of an open campaign that still needs raters
    (ratings plus live leases under its overlap) and that this rater has not seen. Items are locked with SKIP
    LOCKED, so two raters never take the last place of one item."""
    now = now or timezone.now()
    _expire_leases(now)
    live = EvaluationAssignment.objects.filter(rater=user, status="leased").select_related("item__campaign").first()
    if live is not None:
        return live
    seen = EvaluationAssignment.objects.filter(rater=user).values("item_id")
    candidates = (EvaluationItem.objects.filter(status=ItemStatus.OPEN, campaign__status=CampaignStatus.OPEN)
                  .exclude(pk__in=seen).annotate(leased=Count("assignments", filter=Q(assignments__status="leased")))
                  .filter(rating_count__lt=F("required_ratings") - F("leased"))
                  .order_by("campaign_id", "id").values_list("pk", flat=True)[:50])  # fmt: skip
    for pk in candidates:
        item = EvaluationItem.objects.select_for_update(skip_locked=True).filter(pk=pk).select_related("campaign").first()
        if item is None:
            continue
        leased = item.assignments.filter(status="leased").count()
        if leased + item.rating_count >= item.required_ratings:
            continue
        try:
            with transaction.atomic():  # the same rater's second request at once: it gets the lease the first took
                return EvaluationAssignment.objects.create(
                    item=item, rater=user, leased_at=now, expires_at=now + timedelta(seconds=item.campaign.lease_seconds))
        except IntegrityError:
            return EvaluationAssignment.objects.filter(rater=user, status="leased").select_related("item__campaign").first()
    return None


@transaction.atomic
def evaluation_submit(*, user, item_id: int, score, note: str = "", time_on_task_ms=None, now=None) -> EvaluationRating:
    """The rater's score of a leased item, on the item's scale; the item completes at its overlap."""
    now = now or timezone.now()
    assignment = (EvaluationAssignment.objects.select_for_update().filter(item_id=item_id, rater=user)
                  .select_related("item__campaign").first())  # fmt: skip
    if assignment is None:
        raise NotFound(f"you hold no lease on item {item_id}")
    if assignment.status == "submitted":
        raise Conflict(f"item {item_id} is rated already")
    if assignment.status != "leased" or assignment.expires_at <= now:
        raise LeaseExpired(f"your lease on item {item_id} ended; take the next item")
    item = EvaluationItem.objects.select_for_update().select_related("campaign").get(pk=item_id)
    if item.campaign.status != CampaignStatus.OPEN:
        raise Conflict(f"campaign {item.campaign.name!r} is closed")
    scale = scale_of(item)
    points = SCALE_POINTS[scale]
    if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= points:
        raise InvalidInput(f"score must be an integer from 1 to {points} on the {scale} scale", field="score")
    if time_on_task_ms is not None and (isinstance(time_on_task_ms, bool) or not isinstance(time_on_task_ms, int)
                                        or not 0 <= time_on_task_ms <= 86_400_000):  # fmt: skip
        raise InvalidInput("time_on_task_ms must be an integer from 0 to 86,400,000", field="time_on_task_ms")
    note = check_text(note or "", field="note", max_length=MAX_NOTE_CHARS)
    rating = EvaluationRating.objects.create(item=item, rater=user, assignment=assignment, scale=scale, score=score,
                                             note=note, time_on_task_ms=time_on_task_ms)  # fmt: skip
    assignment.status = "submitted"
    assignment.save(update_fields=["status"])
    item.rating_count += 1
    if item.rating_count >= item.required_ratings:
        item.status = ItemStatus.COMPLETE
    item.save(update_fields=["rating_count", "status"])
    return rating


@transaction.atomic
def campaign_close(*, campaign_id: int) -> Campaign:
    campaign = Campaign.objects.select_for_update().filter(pk=campaign_id).first()
    if campaign is None:
        raise NotFound(f"campaign {campaign_id} does not exist")
    if campaign.status == CampaignStatus.CLOSED:
        raise Conflict(f"campaign {campaign.name!r} is already closed")
    campaign.status, campaign.closed_at = CampaignStatus.CLOSED, timezone.now()
    campaign.save(update_fields=["status", "closed_at"])
    EvaluationAssignment.objects.filter(item__campaign=campaign, status="leased").update(status="expired")
    return campaign
