"""A human evaluation campaign in a real browser: a researcher creates it from the dashboard, two raters rate it
with the keyboard alone, and the results page's win / tie / loss bars carry the hand count and its intervals."""

import json
import re

import pytest

from annotation import evaluation_stats as stats
from annotation.models import Campaign, EvaluationItem, EvaluationRating, Role
from annotation.tests.factories import PolicyFactory, annotator

from .conftest import log_in, screenshot

pytestmark = pytest.mark.django_db(transaction=True)
PASSWORD = "pw-for-tests-123"  # the factory's


def test_researcher_creates_a_campaign_raters_use_the_keyboard_and_the_results_match_a_hand_count(page, browser,
                                                                                                  live_server):
    PolicyFactory(name="RLHF-V2")
    PolicyFactory(name="RLHF-V1")
    annotator("lead", role=Role.RESEARCHER)
    for name in ("rater1", "rater2"):
        annotator(name)
    lines = "\n".join(json.dumps({"prompt": f"Question {i}?", "response": f"candidate answer {i}",
                                  "baseline_response": f"baseline answer {i}"}) for i in range(4))  # fmt: skip

    log_in(page, "lead", PASSWORD)
    page.goto("/dashboard/campaigns/")
    page.get_by_label("Name").fill("v2-vs-v1")
    page.get_by_label("Kind").select_option("pairwise")
    page.get_by_label("Candidate policy").select_option("RLHF-V2")
    page.get_by_label("Baseline policy (pairwise)").select_option("RLHF-V1")
    page.get_by_label("Raters an item").fill("2")
    page.locator("#id_prompts_text").fill(lines)
    page.get_by_role("button", name="Create the campaign").click()
    page.get_by_text("Campaign v2-vs-v1 created.").wait_for()
    campaign = Campaign.objects.get(name="v2-vs-v1")
    assert campaign.items.filter(status="open").count() == 4

    # Rater 1 prefers the candidate everywhere (2 = "left is better" when it is left, 6 when it is right); rater 2
    # prefers the baseline on questions 0 and 1 and calls 2 and 3 about the same (4).
    for rater in ("rater1", "rater2"):
        context = browser.new_context(base_url=live_server.url)
        rate = context.new_page()
        log_in(rate, rater, PASSWORD)
        for _ in range(4):
            rate.goto("/rate/")
            form = rate.locator("#rate-form")
            form.wait_for()
            item = EvaluationItem.objects.get(pk=int(re.search(r"/rate/(\d+)/", form.get_attribute("action")).group(1)))
            index = int(item.dialogue.prompt.text.split()[1].rstrip("?"))
            left_is_candidate = rate.locator("[aria-label='Left response']").inner_text().find("candidate") >= 0
            assert left_is_candidate == item.candidate_left
            if rater == "rater1" or index < 2:
                candidate_wins = rater == "rater1"
                key = "2" if candidate_wins == left_is_candidate else "6"
            else:
                key = "4"
            rate.keyboard.press(key)
            assert rate.locator(f"input[name=score][value='{key}']").is_checked()
            with rate.expect_navigation():
                rate.keyboard.press("Enter")
        rate.goto("/rate/")
        rate.locator("#nothing").wait_for()
        if rater == "rater2":
            screenshot(rate, "rate-done")
        context.close()
    assert EvaluationRating.objects.count() == 8

    by_item: dict[int, list[int]] = {}
    for rating in EvaluationRating.objects.select_related("item"):
        by_item.setdefault(rating.item_id, []).append(rating.candidate_score)
    verdicts = [stats.item_verdict(scores) for scores in by_item.values()]
    # Questions 0-1: (win, loss) -> the mean of (4 - score) is 0: tie; 2-3: (win, tie) -> no majority, mean > 0: win.
    assert sorted(verdicts) == ["tie", "tie", "win", "win"]
    low, high = stats.wilson_interval(2, 4)

    page.goto(f"/dashboard/campaigns/{campaign.pk}/")
    chart = page.locator("svg[aria-label^='RLHF-V2 vs RLHF-V1: win / tie / loss']")
    chart.wait_for()
    bars = {b.get_attribute("data-value"): b for b in chart.locator("rect.bar").all()}
    win = chart.locator("rect.bar").nth(0)
    assert float(win.get_attribute("data-value")) == 0.5
    assert float(win.get_attribute("data-low")) == pytest.approx(low)
    assert float(win.get_attribute("data-high")) == pytest.approx(high)
    assert float(chart.locator("rect.bar").nth(1).get_attribute("data-value")) == 0.5  # ties
    assert float(chart.locator("rect.bar").nth(2).get_attribute("data-value")) == 0.0  # losses
    assert chart.locator("path.whisker").count() == 3
    assert len(bars) >= 2
    assert "win (n = 4)" in chart.text_content()
    assert page.locator("#wtl").inner_text().count("2 (0.500)") == 2
    screenshot(page, "campaign-results")


def test_a_dashboard_opened_before_a_run_is_queued_shows_it_without_a_reload(page):
    from annotation.models import TrainingRun

    annotator("lead2", role=Role.RESEARCHER)
    log_in(page, "lead2", PASSWORD)
    page.goto("/dashboard/")
    page.locator("#runs").wait_for()
    assert page.locator("article.run").count() == 0
    page.evaluate("window.__marker = 'no reload'")
    run = TrainingRun.objects.create(kind="sft", params={"prompts": "p.jsonl"})  # queued elsewhere (the API, a command)
    page.locator(f"#run-{run.pk}").wait_for(timeout=20_000)  # the panel polls every 10 s when nothing is live
    assert page.evaluate("window.__marker") == "no reload"
    assert "queued" in page.locator(f"#run-{run.pk}").inner_text()
