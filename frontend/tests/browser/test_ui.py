"""The three journeys in a real browser: annotate with the keyboard alone, adjudicate, read the dashboard."""

import re

import pytest

from annotation.models import (
    Adjudication,
    Annotation,
    ComparisonTask,
    PolicyVersion,
    Prompt,
    RewardModelVersion,
    Role,
    RunStatus,
    TaskStatus,
    TrainingRun,
)
from annotation.services.assignment import annotation_submit, assignment_claim_next
from annotation.tests.factories import BatchFactory, annotator, make_tasks

from .conftest import log_in, screenshot

pytestmark = pytest.mark.django_db(transaction=True)
PASSWORD = "pw-for-tests-123"  # the factory's


def test_annotator_writes_a_prompt_and_compares_with_the_keyboard_alone(page):
    batch = BatchFactory(name="week-browser", overlap=1)
    make_tasks(batch, 3, domain="safety")
    user = annotator("keyboarder", safety=True, helpful=False)

    log_in(page, "keyboarder", PASSWORD)
    page.goto("/prompts/new/")
    # Keyboard only: the domain select has focus; typing picks an option, Tab moves on.
    assert page.evaluate("document.activeElement.id") == "id_domain"
    page.keyboard.press("s")  # Safety: enables the risk category
    page.keyboard.press("Tab")
    page.keyboard.press("u")  # Unqualified advice
    page.keyboard.press("Tab")
    page.keyboard.type("Can I take ibuprofen with my blood pressure pills?")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.get_by_text("Prompt saved").wait_for()
    prompt = Prompt.objects.get(author=user)
    assert (prompt.domain, prompt.risk_category) == ("safety", "unqualified_advice")

    page.goto("/annotate/")
    bench = page.locator("#workbench[data-state=ready]")
    bench.wait_for()
    first = int(bench.get_attribute("data-task-id"))
    assert page.locator("#text-a").inner_text() == "answer A0"
    assert re.fullmatch(r"1[45]:\d\d left", page.get_by_role("timer").inner_text())  # the 15-minute lease
    screenshot(page, "annotate-1280")

    page.keyboard.press("Enter")  # nothing chosen yet: a message, no request
    assert "Choose A or B" in page.get_by_role("alert").inner_text()
    for key in ("2", "d"):
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    assert "safety label" in page.get_by_role("alert").inner_text()
    page.keyboard.press("j")
    page.keyboard.press("n")
    page.keyboard.type("A guesses a dose")
    page.keyboard.press("Escape")
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.getElementById('workbench').dataset.taskId !== '{first}'")

    annotation = Annotation.objects.get(task_id=first, annotator=user)
    assert (annotation.choice, annotation.strength, annotation.safety_label, annotation.note) == (
        "b", "slightly_better", "chosen_safe_other_unsafe", "A guesses a dose")  # fmt: skip
    assert annotation.time_on_task_ms > 0
    progress = page.locator("#progress").inner_text()
    assert "1 today" in progress
    assert "about 2 left" in progress  # 3 on load, the one on screen included; one done

    # Continue the dialogue with the chosen reply: the next message is typed after `m`, Ctrl+Enter submits.
    second = int(bench.get_attribute("data-task-id"))
    for key in ("1", "a", "k", "m"):
        page.keyboard.press(key)
    page.keyboard.type("Thanks. What about paracetamol?")
    page.keyboard.press("Control+Enter")
    page.wait_for_function(f"document.getElementById('workbench').dataset.taskId !== '{second}'")
    annotation = Annotation.objects.get(task_id=second, annotator=user)
    assert (annotation.choice, annotation.strength, annotation.safety_label) == ("a", "significantly_better", "both_safe")
    continued = ComparisonTask.objects.get(opened_by=annotation)
    assert continued.status == TaskStatus.AWAITING_RESPONSES
    assert continued.dialogue.turns.last().text == "Thanks. What about paracetamol?"

    # Skip the third, and the queue is empty.
    page.keyboard.press("x")
    page.locator("#workbench[data-state=empty]").wait_for()
    assert page.get_by_role("heading", name="No comparison for you right now").is_visible()

    page.set_viewport_size({"width": 400, "height": 860})
    page.goto("/prompts/new/")
    screenshot(page, "prompt-400")


def test_narrow_screen_stacks_the_responses(page):
    batch = BatchFactory(name="week-narrow", overlap=1)
    make_tasks(batch, 1)
    annotator("narrow")
    page.set_viewport_size({"width": 400, "height": 860})
    log_in(page, "narrow", PASSWORD)
    page.goto("/annotate/")
    page.locator("#workbench[data-state=ready]").wait_for()
    a, b = page.locator("#resp-a").bounding_box(), page.locator("#resp-b").bounding_box()
    assert b["y"] > a["y"] + a["height"] - 1
    assert a["width"] <= 400
    assert page.evaluate("document.documentElement.scrollWidth") <= 400  # no sideways scrolling
    screenshot(page, "annotate-400")

    # Focus order: each question once, then the text boxes, then the buttons.
    page.locator("input[name=choice]").first.focus()
    order = []
    for _ in range(5):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.name || document.activeElement.id"))
    # A helpfulness task: no safety question (the server refuses a safety label on one).
    assert order == ["strength", "note", "continue_with", "submit", "skip"]


def test_an_empty_response_is_shown_as_such_and_a_helpfulness_task_asks_no_safety_label(page):
    from annotation.services.imports import ComparisonRecord, ResponseRecord, comparisons_store

    batch = BatchFactory(name="week-empty", overlap=1)
    make_tasks(batch, 0)  # registers the SFT policy
    record = ComparisonRecord(turns=(("user", "Where does my neighbour live?"),),
                              response_a=ResponseRecord("", "SFT"), response_b=ResponseRecord("Look it up.", "SFT"),
                              domain="helpfulness")  # fmt: skip
    (task,) = comparisons_store(batch=batch, records=[record]).tasks
    annotator("empty")
    log_in(page, "empty", PASSWORD)
    page.goto("/annotate/")
    page.locator("#workbench[data-state=ready]").wait_for()
    assert page.locator("#text-a").inner_text() == "(empty response)"
    assert "empty" in page.locator("#text-a").get_attribute("class")
    assert page.locator("#text-b").inner_text() == "Look it up."
    assert not page.locator("fieldset.safety").is_visible()
    for key in ("1", "s", "k"):  # k (both safe) does nothing on a helpfulness task
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    page.get_by_text(f"Saved comparison {task.id}").wait_for()
    saved = Annotation.objects.get(task=task)
    assert (saved.choice, saved.strength, saved.safety_label) == ("a", "better", "")


def test_reviewer_adjudicates_a_disagreement(page):
    batch = BatchFactory(name="week-review", overlap=2)
    make_tasks(batch, 1)
    for name, choice in (("ann1", "a"), ("ann2", "b")):
        user = annotator(name)
        held = assignment_claim_next(user=user)
        annotation_submit(user=user, task_id=held.task_id, choice=choice, strength="better")
    annotator("boss-reviewer", role=Role.REVIEWER)

    log_in(page, "boss-reviewer", PASSWORD)
    page.get_by_role("link", name=f"Adjudicate task {held.task_id}").click()
    page.get_by_label("Response B").check()
    page.get_by_label("Slightly better").check()
    page.get_by_label("Reason").fill("B names the dose limit; A is vague")
    screenshot(page, "review-1280")
    page.get_by_role("button", name="Record decision").click()
    page.get_by_text(f"Task {held.task_id} adjudicated.").wait_for()
    decision = Adjudication.objects.get(task_id=held.task_id)
    assert (decision.choice, decision.strength, decision.reason) == ("b", "slightly_better", "B names the dose limit; A is vague")
    assert "Nothing to review" in page.content()


def test_admin_dashboard_charts_render_with_data(page):
    batch = BatchFactory(name="week-dash", overlap=1)
    make_tasks(batch, 4)
    for name in ("ann1", "ann2", "ann3"):
        user = annotator(name)
        held = assignment_claim_next(user=user)
        annotation_submit(user=user, task_id=held.task_id, choice="a", strength="better", time_on_task_ms=5000)
    sft = PolicyVersion.objects.get(name="SFT")
    sft.metrics = {"helpfulness": 0.1, "safety": 0.4}
    sft.save()
    parent = sft
    for i, (h, s) in enumerate([(0.3, 0.5), (0.45, 0.62), (0.6, 0.7)], start=1):
        parent = PolicyVersion.objects.create(name=f"RLHF-V{i}", kind="ppo", parent=parent, metrics={
            "helpfulness": h, "safety": s, "rejection_sampling_curve": [[n, s + 0.1 * i * (n ** 0.3)] for n in (1, 2, 4, 8, 16, 32)]})  # fmt: skip
    for name, acc in (("rm-v1", 0.6), ("rm-v2", 0.66)):
        RewardModelVersion.objects.create(name=name, kind="helpfulness", metrics={
            "accuracy": acc, "by_strength": {s: {"accuracy": acc + d} for s, d in (
                ("significantly_better", 0.25), ("better", 0.1), ("slightly_better", -0.05), ("negligibly_better", -0.1))},
            "by_domain": {"helpfulness": {"accuracy": acc}, "safety": {"accuracy": acc - 0.04}}})  # fmt: skip
    run = TrainingRun.objects.create(kind="ppo", status=RunStatus.RUNNING, progress=0.55, metrics=[
        {"step": s, "loss": 1.2 / (1 + s / 10), "reward": 0.1 + s / 100} for s in range(0, 60, 3)])  # fmt: skip
    annotator("the-admin", role=Role.ADMIN)

    log_in(page, "the-admin", PASSWORD)
    assert page.url.endswith("/dashboard/")
    charts = page.locator("svg.chart")
    assert charts.count() >= 9
    for label in ("Reward-model accuracy by preference strength (Table 8)",
                  "Mean helpfulness and safety score per policy version (Figure 11)",
                  "Rejection sampling: max reward among N samples", "Annotations per annotator"):  # fmt: skip
        chart = page.get_by_role("img", name=label)
        assert chart.is_visible()
        assert chart.bounding_box()["height"] > 100
    assert page.get_by_role("img", name="Reward-model accuracy by preference strength (Table 8)").locator("rect.bar").count() == 10
    assert page.get_by_role("img", name="Mean helpfulness and safety score per policy version (Figure 11)").locator("circle").count() == 4
    bar = page.get_by_role("img", name="Annotations per annotator").locator("rect.bar").first.bounding_box()
    assert bar["height"] > 20  # drawn, not collapsed
    screenshot(page, "dashboard-1280")

    page.get_by_role("button", name=f"Cancel run {run.id}").click()
    page.get_by_text(f"Run {run.id} cancelled").wait_for()
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
