"""The research dashboard: batches, annotators, reward models, policies and training runs, as charts."""

from django.contrib import messages
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from annotation.models import Batch, PolicyVersion, RewardModelVersion, RunStatus, TrainingRun
from annotation.scales import STRENGTH_TEXT
from annotation.selectors import annotator_quality, batch_stats_cached
from annotation.services.errors import AnnotationError
from annotation.services.runs import run_cancel as run_cancel_service
from annotation.services.runs import run_create

from .. import charts
from ..access import DASHBOARD_ROLES, role_required
from ..forms import RoundStartForm, RunStartForm

STRENGTH_LABELS = STRENGTH_TEXT
LIVE = (RunStatus.QUEUED, RunStatus.RUNNING)


def _accuracy(value) -> float | None:
    """A bucket's accuracy: a number, or {"accuracy": x, "n": k} as the reward-model evaluation writes it."""
    if isinstance(value, dict):
        value = value.get("accuracy")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def batch_panels(limit: int = 8) -> list[dict]:
    panels = []
    for batch in Batch.objects.order_by("-created_at", "-id")[:limit]:
        stats = batch_stats_cached(batch)
        days = [(d["date"][5:], d["annotations"]) for d in stats["throughput_per_day"][-14:]]
        panels.append(
            {
                "batch": batch,
                "stats": stats,
                "progress_pct": round(100 * stats["progress"]),
                "domain_agreement": [
                    {"domain": domain, **agreement}
                    for domain, agreement in (stats.get("agreement_by_domain") or {}).items()
                ],
                "throughput_chart": charts.bar_chart(days, title=f"{batch.name}: annotations per day",
                                                     counts=[n for _, n in days], y_label="annotations"),  # fmt: skip
            }
        )
    return panels


def is_imported(username: str) -> bool:
    """An account standing for an imported data set's annotators (annotation.services.imports creates them as
    `source:name`, e.g. `hh-rlhf:crowdworker`); a person's user name cannot hold a colon."""
    return ":" in username


def annotator_panel() -> dict:
    every = annotator_quality()
    rows = [r for r in every if not is_imported(r["username"])]
    imported = [r for r in every if is_imported(r["username"])]
    names = [r["username"] for r in rows]
    n_annotations = [r["annotations"] for r in rows]
    return {
        "rows": rows,
        "imported": imported,
        "throughput_chart": charts.bar_chart(list(zip(names, n_annotations, strict=True)),
                                             title="Annotations per annotator", counts=n_annotations,
                                             y_label="annotations"),  # fmt: skip
        "time_chart": charts.bar_chart(
            [(n, (r["mean_time_on_task_ms"] or 0) / 1000) for n, r in zip(names, rows, strict=True)],
            title="Mean time on task per annotator (seconds)", counts=n_annotations, y_label="seconds",
        ),  # fmt: skip
        "gold_chart": charts.grouped_bar_chart(
            names,
            [("gold accuracy", [r["gold_accuracy"] for r in rows]), ("too-fast rate", [r["too_fast_rate"] for r in rows])],
            title="Gold accuracy and too-fast rate per annotator",
            max_value=1.0,
            counts=[[r["gold_answered"] for r in rows], n_annotations],
            y_label="share",
        ),
        "imported_chart": charts.bar_chart(
            [(r["username"], r["annotations"]) for r in imported],
            title="Imported labels per source (not annotators of this platform)",
            counts=[r["annotations"] for r in imported], y_label="labels",
        ) if imported else "",  # fmt: skip
    }


def _count(value) -> int | None:
    """The n of a bucket written as {"accuracy": x, "n": k}; None when the metric gives none."""
    n = value.get("n") if isinstance(value, dict) else None
    return int(n) if isinstance(n, int | float) and not isinstance(n, bool) else None


def reward_model_panel() -> dict:
    versions = list(RewardModelVersion.objects.order_by("created_at", "id"))
    buckets = [*STRENGTH_LABELS, "overall"]
    series, domains, counts = [], [], []
    for v in versions:
        by_strength = v.metrics.get("by_strength") or {}
        series.append(
            (v.name, [_accuracy(by_strength.get(s)) for s in STRENGTH_LABELS] + [_accuracy(v.metrics.get("accuracy"))])
        )
        overall_n = v.metrics.get("n") if isinstance(v.metrics.get("n"), int) else None
        known = [_count(by_strength.get(s)) for s in STRENGTH_LABELS]
        if overall_n is None and known and all(k is not None for k in known):
            overall_n = sum(known)
        counts.append([*known, overall_n])
        domains += [d for d in (v.metrics.get("by_domain") or {}) if d not in domains]
    domain_series = [(v.name, [_accuracy((v.metrics.get("by_domain") or {}).get(d)) for d in domains]) for v in versions]
    domain_counts = [[_count((v.metrics.get("by_domain") or {}).get(d)) for d in domains] for v in versions]
    return {
        "versions": versions,
        "table": [
            {"name": name, "kind": v.kind, "cells": [f"{100 * x:.1f}" if x is not None else "–" for x in values]}
            for v, (name, values) in zip(versions, series, strict=True)
        ],
        "bucket_labels": [STRENGTH_LABELS.get(b, "Overall") for b in buckets],
        "strength_chart": charts.grouped_bar_chart(
            [STRENGTH_LABELS.get(b, "Overall") for b in buckets], series,
            title="Reward-model accuracy by preference strength (Table 8)", max_value=1.0, counts=counts,
            y_label="accuracy",
        ),  # fmt: skip
        "domain_chart": charts.grouped_bar_chart(
            domains, domain_series, title="Reward-model accuracy by domain", max_value=1.0, counts=domain_counts,
            y_label="accuracy",
        ),
    }


def _lineage(policies: list[PolicyVersion]) -> list[list[PolicyVersion]]:
    """Chains from each root (SFT) through its descendants, e.g. SFT → RLHF-V1 → ... → Vn."""
    children: dict[int | None, list[PolicyVersion]] = {}
    for p in policies:
        children.setdefault(p.parent_id, []).append(p)
    chains = []

    def walk(node: PolicyVersion, chain: list[PolicyVersion]) -> None:
        chain = [*chain, node]
        kids = children.get(node.id, [])
        if not kids:
            chains.append(chain)
        for kid in kids:
            walk(kid, chain)

    for root in children.get(None, []):
        walk(root, [])
    return chains


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def policy_panel() -> dict:
    policies = list(PolicyVersion.objects.order_by("created_at", "id"))
    points = [
        (p.name, h, s)
        for p in policies
        if (h := _number(p.metrics.get("helpfulness"))) is not None and (s := _number(p.metrics.get("safety"))) is not None
    ]
    curves = []
    for p in policies:
        curve = p.metrics.get("rejection_sampling_curve") or []
        pts = [(float(n), float(r)) for n, r in (c for c in curve if isinstance(c, list | tuple) and len(c) == 2)
               if _number(n) is not None and _number(r) is not None]  # fmt: skip
        if pts:
            curves.append((p.name, pts))
    return {
        "chains": _lineage(policies),
        "policies": policies,
        "scores_chart": charts.scatter_chart(
            points, title="Mean helpfulness and safety score per policy version (Figure 11)",
            x_label="helpfulness", y_label="safety",
        ),  # fmt: skip
        "win_chart": charts.interval_bar_chart(
            [(p.name, e["win_rate"], None, None, e.get("n_prompts", 0)) for p in policies
             if isinstance(e := p.metrics.get("evaluation"), dict) and _number(e.get("win_rate")) is not None],
            title="Reward-model win rate of each version against its parent (Figure 11)",
        ),  # fmt: skip
        "rs_chart": charts.line_chart(
            curves, title="Rejection sampling: max reward among N samples", log_x=True, x_label="N (log scale)",
            y_label="max reward",
        ),
    }


def _steps_in_turn(points: list[dict]) -> list[dict]:
    """The points with their steps counted across the parts trained one after another (an ensemble's members,
    a soup's ingredients: each part's steps start from 1 again), so that a run draws as one line."""
    offset, last_part, last_step, out = 0.0, None, 0.0, []
    for p in points:
        if p.get("part") != last_part and last_part is not None:
            offset += last_step
        last_part, last_step = p.get("part"), float(p["step"])
        out.append({**p, "step": offset + last_step})
    return out


def _stage_rows(run: TrainingRun) -> list[dict]:
    """A round's stages in the order they ran: kind, status, progress and what each produced."""
    return [
        {"run": s, "progress_pct": round(100 * s.progress), "made": s.policy_version or s.reward_model_version}
        for s in run.stages.select_related("policy_version", "reward_model_version").order_by("id")
    ]


def run_rows(limit: int = 20) -> list[dict]:
    """Top-level runs, newest first; a round carries its stages as a chain."""
    rows = []
    runs = TrainingRun.objects.filter(parent__isnull=True).select_related("policy_version", "reward_model_version")
    for run in runs[:limit]:
        points = [p for p in run.metrics if isinstance(p, dict) and _number(p.get("step")) is not None] if isinstance(
            run.metrics, list) else []  # fmt: skip
        points = _steps_in_turn(points)
        keys = [k for k in ("loss", "reward", "accuracy", "validation_accuracy", "kl") if any(
            _number(p.get(k)) is not None for p in points)]  # fmt: skip
        loss = [(float(p["step"]), float(p["loss"])) for p in points if _number(p.get("loss")) is not None]
        others = [
            (k, [(float(p["step"]), float(p[k])) for p in points if _number(p.get(k)) is not None])
            for k in keys
            if k != "loss"
        ]
        rows.append(
            {
                "run": run,
                "progress_pct": round(100 * run.progress),
                "live": run.status in LIVE,
                "stages": _stage_rows(run) if run.kind == "round" else [],
                "loss_chart": charts.line_chart([("loss", loss)], title=f"Run {run.id}: loss", x_label="step",
                                                y_label="loss (smoothed; raw points faint)",
                                                smooth=True) if loss else "",  # fmt: skip
                "reward_chart": charts.line_chart(others, title=f"Run {run.id}: reward and accuracy", x_label="step") if others else "",
            }
        )
    return rows


def _batch_names() -> list[str]:
    return list(Batch.objects.order_by("-created_at", "-id").values_list("name", flat=True)[:50])


@role_required(*DASHBOARD_ROLES)
def dashboard(request):
    return dashboard_page(request)


def dashboard_page(request, run_form: RunStartForm | None = None, round_form: RoundStartForm | None = None,
                   status: int = 200):
    """The dashboard, with the start forms as given (bound, with their errors) or empty."""
    runs = run_rows()
    return render(
        request,
        "frontend/dashboard.html",
        {
            "run_form": run_form or RunStartForm(),
            "round_form": round_form or RoundStartForm(batch_names=_batch_names()),
            "nav": "dashboard",
            "batches": batch_panels(),
            "annotators": annotator_panel(),
            "reward_models": reward_model_panel(),
            "policies": policy_panel(),
            "runs": runs,
            "any_live": any(r["live"] for r in runs),
        },
        status=status,
    )


@require_POST
@role_required(*DASHBOARD_ROLES)
def run_start(request):
    """Start a run of any kind, or a round, from the dashboard; a refusal is shown on the form (400)."""
    is_round = request.POST.get("form") == "round"
    form = RoundStartForm(request.POST, batch_names=_batch_names()) if is_round else RunStartForm(request.POST)
    if form.is_valid():
        kind = "round" if is_round else form.cleaned_data["kind"]
        params = form.params() if is_round else form.cleaned_data["params"]
        try:
            run = run_create(kind=kind, params=params, user=request.user)
        except AnnotationError as error:
            form.add_error(None, error.message)
        else:
            messages.success(request, f"Run {run.pk} ({kind}) queued; a worker on the gpu queue takes it.")
            return redirect("frontend:dashboard")
    forms_ = {"round_form": form} if is_round else {"run_form": form}
    return dashboard_page(request, status=400, **forms_)


@role_required(*DASHBOARD_ROLES)
def runs_fragment(request):
    """The training-runs panel alone, polled by dashboard.js while a run is live."""
    runs = run_rows()
    return render(request, "frontend/_runs.html", {"runs": runs, "any_live": any(r["live"] for r in runs)})


@require_POST
@role_required(*DASHBOARD_ROLES)
def run_cancel(request, run_id: int):
    try:
        run_cancel_service(run_id=run_id)
    except AnnotationError as error:
        messages.error(request, error.message)
    else:
        messages.success(request, f"Run {run_id} cancelled; a queued run never starts, a running one stops at its next step.")
    return redirect("frontend:dashboard")
