"""Evaluation campaigns through the API: blind items with recorded sides, exact overlap, ratings on their scale,
and results that match a hand count (win / tie / loss, violation rates, intervals)."""

import json

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from annotation import evaluation_stats as stats
from annotation.models import EvaluationItem, EvaluationRating, Role, TrainingRun
from annotation.tests.factories import PolicyFactory, annotator

pytestmark = pytest.mark.django_db


def _api(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def policies():
    return PolicyFactory(name="RLHF-V2"), PolicyFactory(name="RLHF-V1")


def _pairwise(api, n=8, overlap=3, name="v2-vs-v1"):
    prompts = [{"prompt": f"Question {i}?", "response": f"candidate answer {i}", "baseline_response": f"baseline {i}"}
               for i in range(n)]  # fmt: skip
    response = api.post("/api/v1/campaigns/", {"name": name, "kind": "pairwise", "policy": "RLHF-V2",
                                               "baseline": "RLHF-V1", "overlap": overlap, "prompts": prompts},
                        format="json")  # fmt: skip
    assert response.status_code == 201, response.content
    return response.json()


def test_a_pairwise_campaign_is_blind_sides_are_drawn_and_results_match_a_hand_count(policies):
    lead = _api(annotator("lead", role=Role.RESEARCHER))
    campaign = _pairwise(lead)
    items = list(EvaluationItem.objects.order_by("id"))
    assert {i.status for i in items} == {"open"}
    assert {i.candidate_left for i in items} == {True, False}  # sides are drawn, and recorded
    raters = [annotator(f"r{k}") for k in range(3)]
    # Each rater prefers the candidate on even prompts (wherever it is shown) and the baseline on odd ones; rater 2
    # says "about the same" on prompts 0-1.
    expected_scores: dict[int, list[int]] = {}
    for k, rater in enumerate(raters):
        api = _api(rater)
        while (got := api.post("/api/v1/evaluations/next/")).status_code == 200:
            shown = got.json()
            assert "policy" not in json.dumps(shown)
            assert "v2-vs-v1" not in json.dumps(shown)  # nor the campaign's name, which often names the versions
            assert "RLHF" not in json.dumps(shown)
            assert shown["scale"] == "comparative"
            assert shown["points"] == 7
            assert {"left", "right"} <= set(shown)
            item = EvaluationItem.objects.get(pk=shown["item_id"])
            index = int(item.dialogue.prompt.text.split()[1].rstrip("?"))
            left_is_candidate = shown["left"]["text"].startswith("candidate")
            assert left_is_candidate == item.candidate_left
            candidate_better = index % 2 == 0
            score = 4 if (k == 2 and index < 2) else (2 if candidate_better == left_is_candidate else 6)
            expected_scores.setdefault(index, []).append(score if left_is_candidate else 8 - score)
            response = api.post(f"/api/v1/evaluations/{shown['item_id']}/submit/", {"score": score}, format="json")
            assert response.status_code == 201, response.content
        assert got.status_code == 204
    assert EvaluationRating.objects.count() == 24
    assert set(EvaluationItem.objects.values_list("status", flat=True)) == {"complete"}
    assert _api(annotator("r3")).post("/api/v1/evaluations/next/").status_code == 204  # the overlap is exact

    results = lead.get(f"/api/v1/campaigns/{campaign['id']}/results/").json()
    verdicts = [stats.item_verdict(scores) for scores in expected_scores.values()]
    wins, ties, losses = verdicts.count("win"), verdicts.count("tie"), verdicts.count("loss")
    assert (wins, ties, losses) == (4, 0, 4)  # rater 2's ties on 0-1 are outvoted
    wtl = results["overall"]["win_tie_loss"]
    assert (wtl["win"]["count"], wtl["tie"]["count"], wtl["loss"]["count"], wtl["n"]) == (wins, ties, losses, 8)
    assert wtl["win"]["ci"] == pytest.approx(list(stats.wilson_interval(4, 8)))
    assert results["agreement"]["comparative"]["n_items"] == 8
    markdown = call_command_output("evaluation_report", "v2-vs-v1")
    assert "| all | 8 | 50.0% [" in markdown
    assert "Gwet's AC2" in markdown


def call_command_output(*args) -> str:
    from io import StringIO

    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_a_rating_campaign_reports_violation_rates_per_risk_category(policies):
    lead = _api(annotator("lead", role=Role.RESEARCHER))
    prompts = [{"prompt": f"Risky {i}", "domain": "safety", "risk_category": "illicit_criminal" if i < 4 else "unqualified_advice",
                "response": f"answer {i}"} for i in range(6)] + [{"prompt": "Help", "response": "sure"}]  # fmt: skip
    response = lead.post("/api/v1/campaigns/", {"name": "v2-safety", "kind": "rating", "policy": "RLHF-V2",
                                                "overlap": 2, "prompts": prompts}, format="json")  # fmt: skip
    assert response.status_code == 201, response.content
    ratings = {0: [1, 2], 1: [1, 5], 2: [4, 5], 3: [2, 2], 4: [5, 5], 5: [3, 1]}  # violations: 0, 3 (1 vs 5: mean 3; 3 vs 1: mean 2)
    for k in range(2):
        api = _api(annotator(f"s{k}", safety=True))
        while (got := api.post("/api/v1/evaluations/next/")).status_code == 200:
            shown = got.json()
            if shown["domain"] == "helpfulness":
                assert shown["scale"] == "helpfulness"
                assert shown["points"] == 7
                score = 6
            else:
                assert shown["scale"] == "safety"
                assert shown["points"] == 5
                assert shown["labels"]["1"].startswith("Severe")
                score = ratings[int(shown["dialogue"][0]["content"].split()[1])][k]
            bad = api.post(f"/api/v1/evaluations/{shown['item_id']}/submit/", {"score": 7 if shown["scale"] == "safety" else 0},
                           format="json")  # fmt: skip
            assert bad.status_code == 400
            assert api.post(f"/api/v1/evaluations/{shown['item_id']}/submit/", {"score": score}, format="json").status_code == 201
    results = lead.get(f"/api/v1/campaigns/{response.json()['id']}/results/").json()
    by_risk = results["by_risk_category"]
    assert by_risk["illicit_criminal"]["violation"]["count"] == 2
    assert by_risk["illicit_criminal"]["violation"]["n"] == 4
    assert by_risk["unqualified_advice"]["violation"]["count"] == 1  # (3, 1): mean 2
    assert results["overall"]["violation"]["count"] == 3
    assert results["overall"]["violation"]["n"] == 6
    assert results["by_domain"]["helpfulness"]["helpfulness"]["mean"] == 6


def test_bad_campaigns_are_refused_whole_and_ratings_keep_to_their_lease(policies):
    lead = _api(annotator("lead", role=Role.RESEARCHER))
    bad = [
        ({"kind": "pairwise", "policy": "RLHF-V2"}, "baseline"),
        ({"kind": "rating", "policy": "RLHF-V2", "baseline": "RLHF-V1"}, "baseline"),
        ({"kind": "pairwise", "policy": "RLHF-V2", "baseline": "RLHF-V2"}, "baseline"),
        ({"kind": "rating", "policy": "nope"}, "no policy version"),
    ]
    for body, expected in bad:
        response = lead.post("/api/v1/campaigns/", {"name": "c", "prompts": [{"prompt": "x", "response": "y"}], **body},
                             format="json")  # fmt: skip
        assert response.status_code == 400, body
        assert expected in json.dumps(response.json())
    mixed = [{"prompt": "a", "response": "r", "baseline_response": "b"}, {"prompt": "b", "domain": "safety",
                                                                          "risk_category": "nonsense"}]  # fmt: skip
    assert lead.post("/api/v1/campaigns/", {"name": "c", "kind": "pairwise", "policy": "RLHF-V2", "baseline": "RLHF-V1",
                                            "prompts": mixed}, format="json").status_code == 400  # fmt: skip
    assert not EvaluationItem.objects.exists()
    assert _api(annotator("ann")).post("/api/v1/campaigns/", {}, format="json").status_code == 403

    campaign = _pairwise(lead, n=2, overlap=1)
    rater = _api(annotator("r"))
    assert rater.post("/api/v1/evaluations/999/submit/", {"score": 3}, format="json").status_code == 404
    shown = rater.post("/api/v1/evaluations/next/").json()
    assert rater.post("/api/v1/evaluations/next/").json()["item_id"] == shown["item_id"]  # the same lease again
    assert rater.post(f"/api/v1/evaluations/{shown['item_id']}/submit/", {"score": 3}, format="json").status_code == 201
    assert rater.post(f"/api/v1/evaluations/{shown['item_id']}/submit/", {"score": 3}, format="json").status_code == 409
    assert lead.post(f"/api/v1/campaigns/{campaign['id']}/close/").status_code == 200
    assert rater.post("/api/v1/evaluations/next/").status_code == 204  # a closed campaign serves nothing


def test_a_campaign_without_responses_asks_the_model_worker(policies, django_capture_on_commit_callbacks):
    lead = _api(annotator("lead", role=Role.RESEARCHER))
    response = lead.post("/api/v1/campaigns/", {"name": "sampled", "kind": "pairwise", "policy": "RLHF-V2",
                                                "baseline": "RLHF-V1", "prompts": [{"prompt": "Hi"}]}, format="json")  # fmt: skip
    assert response.status_code == 201
    run = TrainingRun.objects.get()
    assert run.kind == "generation"
    assert run.params == {"campaign": "sampled"}
    assert EvaluationItem.objects.get().status == "awaiting_responses"


def test_create_campaign_command_names_the_bad_line(policies, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok", "response": "r"}\n{"prompt": 3}\n')
    with pytest.raises(CommandError, match="p.jsonl:2: prompt must be a string"):
        call_command("create_campaign", name="c", policy="RLHF-V2", prompts=str(path))
    path.write_text('{"prompt": "ok", "response": "r"}\n')
    call_command("create_campaign", name="c", policy="RLHF-V2", prompts=str(path), overlap=1)
    assert EvaluationItem.objects.get().status == "open"
