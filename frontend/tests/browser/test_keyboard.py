"""Keyboard behaviour a new user tripped over: the form locks while an answer is in flight, Enter in a text box
is a new line, Enter on the "Keyboard" summary opens it, and the reviewer's decision hotkeys."""

import time

import pytest

from annotation.models import Adjudication, Annotation, Role
from annotation.services.assignment import annotation_submit, assignment_claim_next
from annotation.tests.factories import BatchFactory, annotator, make_tasks

from .conftest import log_in

pytestmark = pytest.mark.django_db(transaction=True)
PASSWORD = "pw-for-tests-123"  # the factory's


def _wait_for(predicate, timeout: float = 10.0, page=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        page.wait_for_timeout(50)  # lets Playwright dispatch its events (the route handler) meanwhile


def test_the_form_is_locked_while_an_answer_is_sent_and_enter_in_a_text_box_is_a_new_line(page):
    batch = BatchFactory(name="week-keys", overlap=1)
    make_tasks(batch, 2)
    user = annotator("keys")
    log_in(page, "keys", PASSWORD)
    page.goto("/annotate/")
    bench = page.locator("#workbench[data-state=ready]")
    bench.wait_for()
    first = int(bench.get_attribute("data-task-id"))

    # Enter on the "Keyboard" summary opens the help; nothing is submitted (no answer chosen: no message either).
    page.locator("details.keys summary").focus()
    page.keyboard.press("Enter")
    assert page.evaluate("document.querySelector('details.keys').open")
    assert page.locator("#error").is_hidden()

    # Enter in the note is a new line; Ctrl+Enter submits.
    for key in ("2", "d", "n"):
        page.keyboard.press(key)
    page.keyboard.type("line one")
    page.keyboard.press("Enter")
    page.keyboard.type("line two")
    assert page.locator("#note").input_value() == "line one\nline two"
    assert page.locator("#workbench").get_attribute("data-state") == "ready"

    # Hold the submit at the network: while it is in flight keys change nothing and the form says it is locked.
    held = []
    page.route("**/submit/", lambda route: held.append(route))
    page.keyboard.press("Control+Enter")
    _wait_for(lambda: held, page=page)
    assert page.locator("#workbench").get_attribute("data-state") == "submitting"
    assert page.locator("#judgement").get_attribute("aria-busy") == "true"
    assert page.locator("input[name=choice][value=a]").is_disabled()
    assert "locked" in page.get_by_role("status").inner_text()
    for key in ("1", "a", "x"):
        page.keyboard.press(key)
    assert page.locator("input[name=choice][value=b]").is_checked()
    assert not page.locator("input[name=choice][value=a]").is_checked()
    assert page.locator("input[name=strength][value=slightly_better]").is_checked()
    held[0].continue_()
    page.wait_for_function(f"document.getElementById('workbench').dataset.taskId !== '{first}'")
    page.unroute("**/submit/")
    saved = Annotation.objects.get(task_id=first, annotator=user)
    assert (saved.choice, saved.strength, saved.note) == ("b", "slightly_better", "line one\nline two")
    assert page.locator("#judgement").get_attribute("aria-busy") == "false"
    assert not page.locator("input[name=choice][value=a]").is_disabled()


def test_reviewer_decides_with_hotkeys_and_goes_on_to_the_next_item(page):
    batch = BatchFactory(name="week-hotkeys", overlap=2)
    make_tasks(batch, 2)
    held = []
    for name, choice in (("h1", "a"), ("h2", "b")):
        user = annotator(name)
        for _ in range(2):
            lease = assignment_claim_next(user=user)
            annotation_submit(user=user, task_id=lease.task_id, choice=choice, strength="better")
            held.append(lease.task_id)
    first, second = sorted(set(held))
    annotator("hot-reviewer", role=Role.REVIEWER)

    log_in(page, "hot-reviewer", PASSWORD)
    page.goto(f"/review/{first}/")
    for key in ("2", "d"):
        page.keyboard.press(key)
    assert page.get_by_label("Response B").is_checked()
    assert page.get_by_label("Slightly better").is_checked()
    page.keyboard.press("r")  # to the reason
    page.keyboard.type("B names the dose")
    page.keyboard.press("Control+Enter")
    page.get_by_text(f"Task {first} adjudicated.").wait_for()
    assert page.url.endswith(f"/review/{second}/")  # the next item of the queue
    decision = Adjudication.objects.get(task_id=first)
    assert (decision.choice, decision.strength, decision.reason) == ("b", "slightly_better", "B names the dose")
