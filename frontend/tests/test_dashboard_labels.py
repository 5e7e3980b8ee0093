"""Dashboard: imported labels apart from staff, full axis labels, n on every bar, per-domain agreement, smoothed
loss curves."""

import re

import pytest

from annotation.models import RewardModelVersion, RunStatus, TrainingRun
from annotation.services.assignment import annotation_submit, assignment_claim_next
from annotation.services.imports import VoteRecord
from annotation.tests.factories import BatchFactory, annotator, make_tasks
from frontend import charts

pytestmark = pytest.mark.django_db


def svg(html: str, label: str) -> str:
    match = re.search(r'<svg[^>]*aria-label="' + re.escape(label) + r'".*?</svg>', html, re.S)
    assert match, f"no chart {label!r}"
    return match.group(0)


def test_imported_labels_are_kept_apart_from_the_annotators(researcher_client):
    batch = BatchFactory(name="hh-import", overlap=1)
    make_tasks(batch, 2, votes=[VoteRecord(annotator="hh-rlhf:crowdworker", choice="a")])
    staff = BatchFactory(name="week-staff", overlap=1)
    make_tasks(staff, 1)
    user = annotator("ann1")
    held = assignment_claim_next(user=user)
    annotation_submit(user=user, task_id=held.task_id, choice="a", strength="better")
    html = researcher_client.get("/dashboard/").content.decode()
    per_annotator = svg(html, "Annotations per annotator")
    assert "ann1" in per_annotator
    assert "crowdworker" not in per_annotator
    assert "crowdworker" not in svg(html, "Gold accuracy and too-fast rate per annotator")
    imported = svg(html, "Imported labels per source (not annotators of this platform)")
    assert "hh-rlhf:crowdworker" in imported
    assert 'data-value="2"' in imported


def test_every_bar_carries_its_n_and_labels_are_written_in_full(researcher_client, tasks):
    for name in ("a-rather-long-annotator-name", "ann2"):
        user = annotator(name)
        held = assignment_claim_next(user=user)
        annotation_submit(user=user, task_id=held.task_id, choice="a", strength="better", time_on_task_ms=5000)
    RewardModelVersion.objects.create(name="rm", kind="helpfulness", metrics={
        "accuracy": 0.6, "by_strength": {"better": {"n": 12, "accuracy": 0.7}, "slightly_better": 0.5}})  # fmt: skip
    html = researcher_client.get("/dashboard/").content.decode()
    for label in ("Annotations per annotator", "Mean time on task per annotator (seconds)",
                  "Gold accuracy and too-fast rate per annotator", "week-1: annotations per day",
                  "Reward-model accuracy by preference strength (Table 8)"):  # fmt: skip
        chart = svg(html, label)
        assert chart.count('<rect class="bar') == chart.count('<text class="n"'), label
    assert ">a-rather-long-annotator-name</text>" in svg(html, "Annotations per annotator")  # not cut short
    table8 = svg(html, "Reward-model accuracy by preference strength (Table 8)")
    assert ">n=12</text>" in table8
    assert ">n=?</text>" in table8  # a bucket written without its n says so
    assert "↑ seconds" in svg(html, "Mean time on task per annotator (seconds)")


def test_a_long_label_turns_and_the_chart_grows_to_hold_it():
    chart = charts.bar_chart([("x" * 40, 1.0), ("y" * 40, 2.0)], title="t", counts=[3, 4])
    assert "x" * 40 + "</text>" in chart
    assert "rotate(-35" in chart
    assert 'viewBox="0 0 520 220"' not in chart


def test_batch_panel_shows_agreement_per_domain(researcher_client, batch):
    make_tasks(batch, 1)
    make_tasks(batch, 1, domain="safety")
    for name, choice in (("h1", "a"), ("h2", "b")):
        user = annotator(name, safety=True)
        for _ in range(2):
            held = assignment_claim_next(user=user)
            domain = held.task.domain
            annotation_submit(user=user, task_id=held.task_id, choice=choice if domain == "helpfulness" else "a",
                              strength="better", safety_label="both_safe" if domain == "safety" else "")  # fmt: skip
    html = researcher_client.get("/dashboard/").content.decode()
    table = html.split('class="grid-table domain-agreement"')[1].split("</table>")[0]
    assert "<td>helpfulness</td><td>1</td><td>0%</td>" in table
    assert "<td>safety</td><td>1</td><td>100%</td>" in table


def test_loss_curves_are_smoothed_with_the_raw_points_faint(researcher_client):
    run = TrainingRun.objects.create(kind="reward_model", status=RunStatus.RUNNING, progress=0.4, metrics=[
        {"step": s, "loss": 1.0 + (0.5 if s % 2 else -0.5)} for s in range(60)])  # fmt: skip
    chart = svg(researcher_client.get("/dashboard/").content.decode(), f"Run {run.id}: loss")
    assert 'class="line raw s0"' in chart
    assert 'class="line smooth s0"' in chart
    assert chart.count('class="dot raw') == 60
    smoothed = charts.ema([(s, 1.0 + (0.5 if s % 2 else -0.5)) for s in range(60)])
    assert max(y for _, y in smoothed[20:]) - min(y for _, y in smoothed[20:]) < 0.5  # the zigzag is damped
