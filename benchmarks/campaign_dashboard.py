"""An evaluation campaign's results page with 200,000 ratings, and the next item after a rating, in process on
PostgreSQL under the production settings.

    .venv/bin/python benchmarks/campaign_dashboard.py [--ratings 200000] [--loads 5] [--rates 50]

A pairwise campaign (3 raters an item, a third of the items safety prompts over three risk categories) is written
with bulk inserts; then it times:
- `results_cold_ms`: `campaign_results` with its cache empty (every figure counted afresh: win / tie / loss with
  intervals overall, per domain and per risk category, AC2 and alpha);
- `page_open_ms`: the campaign's results page while raters keep rating (each load after a new rating: cold);
- `page_cached_ms`: the page again with no new rating (the cache);
- `next_item_after_submit_ms`: a rater's POST of a rating and the GET of the next item it redirects to (the rating
  page's round trip), median and p95 over `--rates` ratings on a second, open campaign.
Goals (issue 16): the page under 500 ms server time; the next item under 150 ms. No peer: Label Studio and Argilla
have no evaluation-campaign results to time.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.dashboard_load import median_ms  # noqa: E402
from benchmarks.platform_env import ROOT, fresh_database, percentile  # noqa: E402

RISKS = ["illicit_criminal", "hateful_harmful", "unqualified_advice"]


def populate(n_ratings: int, *, name: str, overlap: int = 3, rated: bool = True):
    """A pairwise campaign of n_ratings / overlap items, each rated by `overlap` raters (or none)."""
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from annotation.models import (
        Campaign,
        Dialogue,
        EvaluationAssignment,
        EvaluationItem,
        EvaluationRating,
        PolicyVersion,
        Prompt,
        Response,
        Turn,
    )

    v2, _ = PolicyVersion.objects.get_or_create(name="RLHF-V2")
    v1, _ = PolicyVersion.objects.get_or_create(name="RLHF-V1")
    campaign = Campaign.objects.create(name=name, kind="pairwise", policy=v2, baseline=v1, overlap=overlap)
    users = get_user_model()
    raters = [users.objects.get_or_create(username=f"bench-rater-{k}")[0] for k in range(30)]
    n_items = n_ratings // overlap
    now = timezone.now()
    for start in range(0, n_items, 5000):
        count = min(5000, n_items - start)
        safety = [(start + i) % 3 == 0 for i in range(count)]
        prompts = Prompt.objects.bulk_create([
            Prompt(text=f"Question {start + i}?", domain="safety" if s else "helpfulness",
                   risk_category=RISKS[(start + i) % 9 // 3] if s else "", source="bench")
            for i, s in enumerate(safety)])  # fmt: skip
        dialogues = Dialogue.objects.bulk_create([Dialogue(prompt=p) for p in prompts])
        Turn.objects.bulk_create([Turn(dialogue=d, position=0, role="user", text=p.text) for d, p in zip(dialogues, prompts, strict=True)])
        candidates = Response.objects.bulk_create([
            Response(dialogue=d, context_length=1, text=f"A careful answer {start + i}. " * 10, policy_version=v2)
            for i, d in enumerate(dialogues)])  # fmt: skip
        baselines = Response.objects.bulk_create([
            Response(dialogue=d, context_length=1, text=f"A short answer {start + i}.", policy_version=v1)
            for i, d in enumerate(dialogues)])  # fmt: skip
        items = EvaluationItem.objects.bulk_create([
            EvaluationItem(campaign=campaign, dialogue=d, context_length=1, domain=p.domain,
                           risk_category=p.risk_category, response=c, baseline_response=b,
                           candidate_left=(start + i) % 2 == 0, status="complete" if rated else "open",
                           required_ratings=overlap, rating_count=overlap if rated else 0)
            for i, (d, p, c, b) in enumerate(zip(dialogues, prompts, candidates, baselines, strict=True))])  # fmt: skip
        if not rated:
            continue
        leases = EvaluationAssignment.objects.bulk_create([
            EvaluationAssignment(item=item, rater=raters[(start + i + j * 7) % len(raters)], status="submitted",
                                 leased_at=now, expires_at=now)
            for i, item in enumerate(items) for j in range(overlap)])  # fmt: skip
        EvaluationRating.objects.bulk_create([
            EvaluationRating(item=lease.item, rater=lease.rater, assignment=lease, scale="comparative",
                             score=1 + (lease.item_id * 7 + k) % 7, time_on_task_ms=30000)
            for k, lease in enumerate(leases)])  # fmt: skip
    return campaign


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratings", type=int, default=200_000)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--rates", type=int, default=50)
    args = parser.parse_args()

    env = fresh_database("rlhf_bench_campaign")
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--no-input", "-v0"], cwd=ROOT, env=env, check=True)
    t0 = time.perf_counter()
    campaign = populate(args.ratings, name="bench-campaign")
    populate_s = time.perf_counter() - t0
    from django.contrib.auth import get_user_model
    from django.core.cache import cache
    from django.db import connection
    from django.test import Client

    from annotation.evaluation_results import campaign_results
    from annotation.models import AnnotatorProfile, EvaluationRating, Role

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    lead = get_user_model().objects.create(username="bench-lead")
    AnnotatorProfile.objects.create(user=lead, role=Role.RESEARCHER)
    client = Client(HTTP_HOST="127.0.0.1")
    client.force_login(lead)
    url = f"/dashboard/campaigns/{campaign.pk}/"

    def cold() -> None:
        cache.clear()
        campaign_results(campaign)

    def page_after_a_rating() -> None:
        # a new rating arrives between loads: the cached figures no longer hold
        rating = EvaluationRating.objects.filter(item__campaign=campaign).order_by("-id").first()
        EvaluationRating.objects.filter(pk=rating.pk).update(score=1 + rating.score % 7)
        cache.clear()
        assert client.get(url).status_code == 200

    def page() -> None:
        assert client.get(url).status_code == 200

    page()  # warm-up
    out = {"ratings": EvaluationRating.objects.filter(item__campaign=campaign).count(), "populate_s": round(populate_s, 1),
           "results_cold_ms": median_ms(cold, args.loads), "page_open_ms": median_ms(page_after_a_rating, args.loads),
           "page_cached_ms": median_ms(page, args.loads)}  # fmt: skip

    open_campaign = populate(args.rates * 3, name="bench-open", rated=False)
    rater = get_user_model().objects.create(username="bench-fast-rater")
    rater_client = Client(HTTP_HOST="127.0.0.1")
    rater_client.force_login(rater)
    body = rater_client.get("/rate/").content.decode()
    times = []
    for _ in range(args.rates):
        item_id = int(body.split('action="/rate/')[1].split("/")[0])
        t0 = time.perf_counter()
        response = rater_client.post(f"/rate/{item_id}/", {"score": "3", "time_on_task_ms": "9000"}, follow=True)
        times.append((time.perf_counter() - t0) * 1000)
        body = response.content.decode()
        assert response.status_code == 200
    out["next_item_after_submit_ms"] = {"median": round(statistics.median(times), 1),
                                        "p95": round(percentile(times, 95), 1), "n": len(times)}  # fmt: skip
    out["open_campaign_items"] = open_campaign.items.count()
    out["goals"] = {"page_open_ms_under": 500, "next_item_ms_under": 150}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
