"""The research dashboard: every panel draws its chart from the data, and runs can be cancelled."""

import re

import pytest

from annotation.models import PolicyVersion, RewardModelVersion, RunStatus, TrainingRun
from annotation.services.assignment import annotation_submit, assignment_claim_next
from annotation.tests.factories import annotator
from frontend import charts

pytestmark = pytest.mark.django_db


def svg(html: str, label: str) -> str:
    match = re.search(r'<svg[^>]*aria-label="' + re.escape(label) + r'".*?</svg>', html, re.S)
    assert match, f"no chart {label!r}"
    return match.group(0)


@pytest.fixture
def registry(db):
    sft, _ = PolicyVersion.objects.update_or_create(
        name="SFT", defaults={"kind": "sft", "metrics": {"helpfulness": 0.2, "safety": 0.5}})  # fmt: skip
    v1 = PolicyVersion.objects.create(name="RLHF-V1", kind="rejection_sampling", parent=sft,
                                      metrics={"helpfulness": 0.35, "safety": 0.6,
                                               "rejection_sampling_curve": [[1, 0.1], [4, 0.4], [16, 0.6], [64, 0.7]]})  # fmt: skip
    PolicyVersion.objects.create(name="RLHF-V2", kind="ppo", parent=v1, is_current=True,
                                 metrics={"helpfulness": 0.5, "safety": 0.72})  # fmt: skip
    RewardModelVersion.objects.create(name="helpful-rm-v1", kind="helpfulness", metrics={
        "accuracy": 0.64,
        "by_strength": {"significantly_better": {"n": 10, "accuracy": 0.9}, "better": {"n": 10, "accuracy": 0.7},
                        "slightly_better": {"n": 10, "accuracy": 0.6}, "negligibly_better": 0.5},
        "by_domain": {"helpfulness": {"n": 30, "accuracy": 0.66}, "safety": 0.6}})  # fmt: skip
    RewardModelVersion.objects.create(name="safety-rm-v1", kind="safety", metrics={})
    return TrainingRun.objects.create(kind="reward_model", status=RunStatus.RUNNING, progress=0.4, metrics=[
        {"step": s, "loss": 0.7 - 0.01 * s, "accuracy": 0.5 + 0.01 * s} for s in range(0, 30, 5)])  # fmt: skip


def test_dashboard_draws_every_panel_from_the_data(researcher_client, tasks, registry):
    for name in ("ann1", "ann2"):
        user = annotator(name)
        held = assignment_claim_next(user=user)
        annotation_submit(user=user, task_id=held.task_id, choice="a", strength="better", time_on_task_ms=6000)
    html = researcher_client.get("/dashboard/").content.decode()

    assert svg(html, "week-1: annotations per day").count('class="bar') == 1
    assert "100%" in html  # agreement of the two matching labels
    assert svg(html, "Annotations per annotator").count('data-value="1"') == 2
    assert svg(html, "Mean time on task per annotator (seconds)").count('data-value="6.0"') == 2
    table8 = svg(html, "Reward-model accuracy by preference strength (Table 8)")
    assert table8.count('class="bar') == 5
    assert 'data-value="0.9"' in table8
    assert 'data-value="0.64"' in table8
    assert svg(html, "Reward-model accuracy by domain").count('class="bar') == 2
    fig11 = svg(html, "Mean helpfulness and safety score per policy version (Figure 11)")
    assert fig11.count("<circle") == 3
    assert ">RLHF-V2</text>" in fig11
    assert svg(html, "Rejection sampling: max reward among N samples").count("<circle") == 4
    assert re.search(r"SFT.*RLHF-V1.*RLHF-V2", html.split('class="lineage"')[1].split("</ol>")[0], re.S)
    assert svg(html, f"Run {registry.id}: loss").count("<circle") == 6
    assert f"Cancel run {registry.id}" in html
    assert 'data-live="1"' in html


def test_empty_dashboard_says_so(researcher_client):
    html = researcher_client.get("/dashboard/").content.decode()
    for text in ("No batches yet.", "No policies yet.", "No training runs yet."):
        assert text in html
    assert "<svg" not in html


def test_cancel_a_running_run(researcher_client, registry):
    response = researcher_client.post(f"/dashboard/runs/{registry.id}/cancel/", follow=True)
    registry.refresh_from_db()
    assert registry.status == RunStatus.CANCELLED
    assert registry.finished_at is None  # its worker writes when it stopped, at its next step
    assert "stops at the next step" in registry.error
    assert "cancelled" in response.content.decode()
    again = researcher_client.post(f"/dashboard/runs/{registry.id}/cancel/", follow=True)
    assert "only a queued or running run can be cancelled" in again.content.decode()


def test_runs_fragment_and_cancel_are_for_researchers(annotator_client, registry):
    assert annotator_client.get("/dashboard/runs/").status_code == 403
    assert annotator_client.post(f"/dashboard/runs/{registry.id}/cancel/").status_code == 403
    registry.refresh_from_db()
    assert registry.status == RunStatus.RUNNING


def test_chart_labels_are_escaped():
    chart = charts.bar_chart([("<b>x</b>", 1.0)], title='"><script>')
    assert "<script>" not in chart
    assert "<b>" not in chart
    assert "&lt;b&gt;" in chart


def test_malformed_metrics_do_not_break_the_dashboard(researcher_client):
    RewardModelVersion.objects.create(name="odd", kind="safety", metrics={"by_strength": {"better": "high"},
                                                                         "accuracy": True})  # fmt: skip
    PolicyVersion.objects.create(name="P", metrics={"helpfulness": "x", "rejection_sampling_curve": [[1], "z", [2, 3]]})
    TrainingRun.objects.create(kind="ppo", metrics=[{"step": "a"}, 5, {"step": 1, "reward": 0.3}])
    response = researcher_client.get("/dashboard/")
    assert response.status_code == 200


def test_an_ensemble_runs_members_draw_one_after_another():
    from frontend.views.dashboard import _steps_in_turn

    points = [{"step": s, "loss": 1.0 / s, "part": part} for part in range(3) for s in (1, 2, 3)]
    assert [p["step"] for p in _steps_in_turn(points)] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert [p["loss"] for p in _steps_in_turn(points)] == [p["loss"] for p in points]
    plain = [{"step": s, "loss": 0.5} for s in (0, 5, 10)]
    assert _steps_in_turn(plain) == plain


def test_a_researcher_starts_a_round_and_a_run_from_the_dashboard(researcher_client, tasks):
    from annotation.models import Batch

    batch_name = Batch.objects.order_by("id").first().name
    page = researcher_client.get("/dashboard/")
    assert b"Start a round" in page.content
    assert batch_name.encode() in page.content
    response = researcher_client.post("/dashboard/runs/start/", {"form": "round", "batches": [batch_name], "name": "RLHF-V7",
                                                                 "ppo_iterations": 5})  # fmt: skip
    assert response.status_code == 302
    run = TrainingRun.objects.get(kind="round")
    assert run.params == {"batches": [batch_name], "name": "RLHF-V7", "ppo": {"iterations": 5}}
    assert run.status == RunStatus.QUEUED

    refused = researcher_client.post("/dashboard/runs/start/", {"form": "run", "kind": "ppo", "params": '{"iterations": 0}'})
    assert refused.status_code == 400
    assert b"params.iterations: must be between 1" in refused.content
    nan = researcher_client.post("/dashboard/runs/start/", {"form": "run", "kind": "round",
                                                             "params": '{"ppo": {"iterations": NaN}}'})  # fmt: skip
    assert nan.status_code == 400
    assert b"NaN is not a JSON number" in nan.content
    not_json = researcher_client.post("/dashboard/runs/start/", {"form": "run", "kind": "ppo", "params": "{iterations"})
    assert not_json.status_code == 400
    assert b"params is not valid JSON" in not_json.content
    assert TrainingRun.objects.count() == 1


def test_a_rounds_stages_show_as_a_chain_under_it(researcher_client, db):
    round_run = TrainingRun.objects.create(kind="round", status=RunStatus.RUNNING, params={"batches": ["w"]})
    rm = RewardModelVersion.objects.create(name="V1-helpfulness", kind="helpfulness")
    TrainingRun.objects.create(kind="reward_model", parent=round_run, status=RunStatus.SUCCEEDED,
                               params={"kind": "helpfulness", "stage": "reward_model:helpfulness"}, reward_model_version=rm)
    TrainingRun.objects.create(kind="rejection_sampling", parent=round_run, status=RunStatus.RUNNING, progress=0.25,
                               params={"stage": "rejection_sampling"})  # fmt: skip
    html = researcher_client.get("/dashboard/runs/").content.decode()
    chain = re.search(r'<ol class="lineage chain" aria-label="Run \d+ stages">(.*?)</ol>', html, re.S).group(1)
    assert "Reward Model (helpfulness)" in chain
    assert "→ V1-helpfulness" in chain
    assert "Rejection Sampling" in chain
    assert "running 25%" in chain
    assert html.count('<article class="run"') == 1  # the stages are not listed again as runs of their own


def test_annotators_cannot_start_runs(client, db):
    client.force_login(annotator("ann"))
    assert client.post("/dashboard/runs/start/", {"form": "run", "kind": "sft", "params": "{}"}).status_code == 403
    assert not TrainingRun.objects.exists()
