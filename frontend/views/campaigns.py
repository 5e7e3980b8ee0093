"""Evaluation campaigns in the browser: raters rate (keyboard first), researchers create campaigns and read their
results as the report draws them (win / tie / loss and violation bars with 95% intervals)."""

from django.contrib import messages
from django.db.models import Count, Q
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from annotation.evaluation_results import campaign_results, evaluation_payload
from annotation.models import Campaign, PolicyVersion
from annotation.services.campaigns import (
    campaign_close,
    campaign_create,
    evaluation_claim_next,
    evaluation_submit,
    prompt_rows,
)
from annotation.services.errors import AnnotationError
from annotation.validation import check_time_on_task_ms

from .. import charts
from ..access import DASHBOARD_ROLES, role_required
from ..forms import CampaignForm


@role_required()
def rate(request):
    """The next item to rate, or a note that there is none."""
    assignment = evaluation_claim_next(user=request.user)
    payload = evaluation_payload(assignment) if assignment else None
    if payload:
        payload["choices"] = [(int(k), v) for k, v in payload["labels"].items()]
    return render(request, "frontend/rate.html", {"nav": "rate", "item": payload})


@require_POST
@role_required()
def rate_submit(request, item_id: int):
    try:
        score = int(request.POST.get("score", ""))
    except ValueError:
        messages.error(request, "choose a point on the scale (its number key) before submitting")
        return redirect("frontend:rate")
    try:
        evaluation_submit(user=request.user, item_id=item_id, score=score, note=request.POST.get("note", ""),
                          time_on_task_ms=check_time_on_task_ms(request.POST.get("time_on_task_ms")))  # fmt: skip
    except AnnotationError as error:
        messages.error(request, error.message)
    return redirect("frontend:rate")


@role_required(*DASHBOARD_ROLES)
def campaigns(request):
    """Campaigns and their state; a form creates one from prompts (a prompts file's lines) and one or two versions."""
    policies = list(PolicyVersion.objects.order_by("-created_at").values_list("name", flat=True))
    form = CampaignForm(request.POST or None, request.FILES or None, policies=policies)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            d = form.cleaned_data
            try:
                upload = d.get("prompts_file")
                text = upload.read().decode("utf-8") if upload else d["prompts_text"]
                campaign = campaign_create(name=d["name"], kind=d["kind"], policy=d["policy"],
                                           baseline=d.get("baseline") or None, prompts=prompt_rows(text, source=upload.name if upload else "prompts"),
                                           overlap=d["overlap"], user=request.user)  # fmt: skip
            except (AnnotationError, UnicodeDecodeError) as error:
                form.add_error(None, getattr(error, "message", str(error)))
            else:
                messages.success(request, f"Campaign {campaign.name} created.")
                return redirect("frontend:campaign", campaign_id=campaign.pk)
        status = 400
    campaigns = Campaign.objects.select_related("policy", "baseline").annotate(
        n_items=Count("items"), n_complete=Count("items", filter=Q(items__status="complete")),
        n_waiting=Count("items", filter=Q(items__status="awaiting_responses")))[:30]  # counts only: one query  # fmt: skip
    return render(request, "frontend/campaigns.html", {"nav": "campaigns", "form": form, "campaigns": campaigns},
                  status=status)  # fmt: skip


def result_charts(results: dict) -> list:
    """The campaign's charts: win / tie / loss (pairwise) or mean ratings and violation rates (rating), overall and
    per risk category, each bar with its 95% interval and n."""
    out = []
    overall = results["overall"]
    if results["kind"] == "pairwise":
        wtl = overall.get("win_tie_loss")
        if wtl:
            out.append(charts.interval_bar_chart(
                [(k, wtl[k]["rate"], *wtl[k]["ci"], wtl["n"]) for k in ("win", "tie", "loss")],
                title=f"{results['policy']} vs {results['baseline']}: win / tie / loss (95% intervals)"))  # fmt: skip
        groups = [(d, g) for d, g in results["by_domain"].items()]
        if groups:
            out.append(charts.interval_bar_chart(
                [(d, g["win_tie_loss"]["win"]["rate"], *g["win_tie_loss"]["win"]["ci"], g["win_tie_loss"]["n"])
                 for d, g in groups], title="Win rate by domain (95% intervals)"))  # fmt: skip
        return out
    if "helpfulness" in overall:
        h = overall["helpfulness"]
        out.append(charts.interval_bar_chart([("helpfulness", h["mean"], *h["ci"], h["n"])], max_value=7,
                                             percent=False, title="Mean helpfulness rating, 1-7 (95% interval)"))  # fmt: skip
    if "violation" in overall:
        rows = [("all", overall["violation"])] + [(c, g["violation"]) for c, g in results["by_risk_category"].items()
                                                  if "violation" in g]  # fmt: skip
        out.append(charts.interval_bar_chart([(n, v["rate"], *v["ci"], v["n"]) for n, v in rows],
                                             title="Violation rate (safety rating 1-2), overall and by risk category"))  # fmt: skip
    return out


@role_required(*DASHBOARD_ROLES)
def campaign(request, campaign_id: int):
    campaign = get_object_or_404(Campaign.objects.select_related("policy", "baseline"), pk=campaign_id)
    results = campaign_results(campaign)
    return render(request, "frontend/campaign.html", {"nav": "campaigns", "campaign": campaign, "results": results,
                                                      "charts": result_charts(results)})  # fmt: skip


@require_POST
@role_required(*DASHBOARD_ROLES)
def campaign_close_view(request, campaign_id: int):
    try:
        campaign_close(campaign_id=campaign_id)
    except AnnotationError as error:
        messages.error(request, error.message)
    return redirect("frontend:campaign", campaign_id=campaign_id)
