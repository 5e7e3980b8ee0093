"""Reads: batch statistics, annotator quality, the tasks an annotator may see."""

from collections import Counter
from datetime import datetime

from django.core.cache import cache
from django.db import connection
from django.db.models import Avg, Count, F, Max, Q, Sum
from django.db.models.functions import TruncDate

from annotation.agreement import krippendorff_alpha, percent_agreement
from annotation.models import Annotation, Batch, BatchStatus, ComparisonTask, EvaluationItem, TaskStatus, Turn
from annotation.models.tasks import SlotState, TaskSlot
from annotation.scales import Choice, Strength, signed_preference
from annotation.services.review import tasks_needing_review


def batch_agreement(batch: Batch, *, domain: str | None = None) -> dict:
    """Agreement on non-gold tasks with two or more annotations: choice (nominal), signed strength (ordinal).

    The database counts the tasks by their make-up, how many annotations of each (choice, strength) they hold
    (a few hundred kinds at most), so that no annotation row leaves it: 66,666 tasks of three votes in 0.17 s
    where fetching their 200,000 rows and grouping them in Python took 0.51 s (benchmarks/dashboard_load.py).
    """
    kinds = [(choice.value, strength) for choice in Choice for strength in ("", *(s.value for s in Strength))]
    columns = ", ".join(f"SUM(CASE WHEN a.choice = %s AND a.strength = %s THEN 1 ELSE 0 END) AS n{i}"
                        for i in range(len(kinds)))
    names = ", ".join(f"n{i}" for i in range(len(kinds)))
    sql = (
        f"SELECT {names}, COUNT(*) FROM (SELECT {columns}"
        f" FROM {Annotation._meta.db_table} a JOIN {ComparisonTask._meta.db_table} t ON t.id = a.task_id"
        " WHERE t.batch_id = %s AND t.is_gold = %s AND t.annotation_count >= 2"
        + (" AND t.domain = %s" if domain else "")
        + " GROUP BY a.task_id) units"
        f" GROUP BY {names}"
    )
    params = [value for kind in kinds for value in kind] + [batch.pk, False] + ([domain] if domain else [])
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        made_up = cursor.fetchall()
    choices: Counter[tuple] = Counter()  # a unit's choices -> how many tasks
    signed: Counter[tuple] = Counter()  # a unit's signed strengths -> how many tasks
    for *counts, n_tasks in made_up:
        held = [kind for kind, n in zip(kinds, counts, strict=True) for _ in range(int(n))]
        choices[tuple(sorted(choice for choice, _ in held))] += n_tasks
        strengths = tuple(sorted(signed_preference(choice, strength) for choice, strength in held if strength))
        if strengths:
            signed[strengths] += n_tasks
    return {
        "tasks_with_overlap": sum(choices.values()),
        "percent_agreement": percent_agreement(choices),
        "alpha_choice": krippendorff_alpha(choices, level="nominal"),
        "alpha_strength_ordinal": krippendorff_alpha(signed, level="ordinal"),
    }


def gold_accuracy(annotations) -> float | None:
    gold = annotations.filter(task__is_gold=True)
    total = gold.count()
    if not total:
        return None
    return gold.filter(choice=F("task__gold_choice")).count() / total


def batch_stats(batch: Batch) -> dict:
    """Progress, throughput per day, agreement, gold accuracy and too-fast rate of one batch."""
    tasks = ComparisonTask.objects.filter(batch=batch, is_gold=False)
    by_status = dict(tasks.values_list("status").annotate(n=Count("id")).values_list("status", "n"))
    annotations = Annotation.objects.filter(task__batch=batch)
    required = tasks.exclude(status=TaskStatus.AWAITING_RESPONSES).aggregate(
        need=Sum("required_annotations")
    )["need"] or 0
    agg = annotations.aggregate(
        n=Count("id"), done=Count("id", filter=Q(task__is_gold=False)), too_fast=Count("id", filter=Q(too_fast=True)),
        avg_ms=Avg("time_on_task_ms"),
    )
    done = agg["done"]
    per_day = [
        {"date": d.isoformat(), "annotations": n}
        for d, n in annotations.annotate(day=TruncDate("created_at"))
        .values("day")
        .annotate(n=Count("id"))
        .order_by("day")
        .values_list("day", "n")
    ]
    return {
        "batch": batch.name,
        "status": batch.status,
        "tasks": {status: by_status.get(status, 0) for status in TaskStatus.values},
        "gold_tasks": ComparisonTask.objects.filter(batch=batch, is_gold=True).count(),
        "annotations": agg["n"],
        "progress": done / required if required else 0.0,
        "throughput_per_day": per_day,
        "mean_time_on_task_ms": agg["avg_ms"],
        "too_fast_rate": agg["too_fast"] / agg["n"] if agg["n"] else None,
        "gold_accuracy": gold_accuracy(annotations),
        "agreement": batch_agreement(batch),
        # The same per domain (helpfulness and safety labels follow different guidelines), for domains present.
        "agreement_by_domain": {
            domain: batch_agreement(batch, domain=domain)
            for domain in sorted(set(tasks.values_list("domain", flat=True).distinct()))
        },
        "splits": dict(tasks.exclude(split="").values_list("split").annotate(n=Count("id")).values_list("split", "n")),
    }


def batch_stats_cached(batch: Batch) -> dict:
    """`batch_stats` for the dashboard: a closed batch's are kept in the cache for five minutes, keyed on its
    closing time and on the count and last id of its annotations and tasks (so a submit that raced the
    close, or an admin adding or deleting rows, gives a new key; an admin's edit of a row shows within five
    minutes). Open batches are counted afresh."""
    if batch.status != BatchStatus.CLOSED or batch.closed_at is None:
        return batch_stats(batch)
    annotations = Annotation.objects.filter(task__batch=batch).aggregate(n=Count("id"), last=Max("id"))
    tasks = ComparisonTask.objects.filter(batch=batch).aggregate(n=Count("id"), last=Max("id"))
    fingerprint = f"{annotations['n']}-{annotations['last']}-{tasks['n']}-{tasks['last']}"
    key = f"batch-stats:v3:{batch.pk}:{batch.closed_at.isoformat()}:{fingerprint}"
    return cache.get_or_set(key, lambda: batch_stats(batch), timeout=300)


def annotator_quality(*, batch: Batch | None = None, since: datetime | None = None) -> list[dict]:
    """Per annotator: throughput, time on task, gold accuracy and too-fast rate."""
    qs = Annotation.objects.all()
    if batch is not None:
        qs = qs.filter(task__batch=batch)
    if since is not None:
        qs = qs.filter(created_at__gte=since)
    rows = (
        qs.values("annotator_id", "annotator__username")
        .annotate(
            annotations=Count("id"),
            gold=Count("id", filter=Q(task__is_gold=True)),
            gold_correct=Count("id", filter=Q(task__is_gold=True, choice=F("task__gold_choice"))),
            too_fast=Count("id", filter=Q(too_fast=True)),
            mean_time_on_task_ms=Avg("time_on_task_ms"),
        )
        .order_by("annotator__username")
    )
    return [
        {
            "annotator_id": r["annotator_id"],
            "username": r["annotator__username"],
            "annotations": r["annotations"],
            "gold_answered": r["gold"],
            "gold_accuracy": r["gold_correct"] / r["gold"] if r["gold"] else None,
            "too_fast_rate": r["too_fast"] / r["annotations"],
            "mean_time_on_task_ms": r["mean_time_on_task_ms"],
        }
        for r in rows
    ]


def task_context(task: ComparisonTask) -> list[dict]:
    """The dialogue turns shown with a task, as chat messages."""
    return [
        {"role": role, "content": text}
        for role, text in Turn.objects.filter(dialogue_id=task.dialogue_id, position__lt=task.context_length)
        .order_by("position")
        .values_list("role", "text")
    ]


def assignment_payload(assignment) -> dict:
    """What an annotator is shown for a lease: context, both responses, lease times (two plain queries).

    Blind by construction: no policy names, no gold flag, no one else's labels.
    """
    from django.db import connection

    from annotation.models import Dialogue, Prompt, Response

    t, p, d, r = (m._meta.db_table for m in (ComparisonTask, Prompt, Dialogue, Response))
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT t.id, b.name, t.domain, p.risk_category, ra.id, ra.text, rb.id, rb.text, t.dialogue_id,"
            f" t.context_length FROM {t} t JOIN {Batch._meta.db_table} b ON b.id = t.batch_id"
            f" JOIN {d} d ON d.id = t.dialogue_id JOIN {p} p ON p.id = d.prompt_id"
            f" JOIN {r} ra ON ra.id = t.response_a_id JOIN {r} rb ON rb.id = t.response_b_id WHERE t.id = %s",
            [assignment.task_id],
        )
        task_id, batch, domain, risk, a_id, a_text, b_id, b_text, dialogue_id, context_length = cursor.fetchone()
        cursor.execute(
            f"SELECT role, text FROM {Turn._meta.db_table} WHERE dialogue_id = %s AND position < %s ORDER BY position",
            [dialogue_id, context_length],
        )
        dialogue = [{"role": role, "content": text} for role, text in cursor.fetchall()]
    return {
        "task_id": task_id,
        "batch": batch,
        "domain": domain,
        "risk_category": risk,
        "dialogue": dialogue,
        "response_a": {"id": a_id, "text": a_text},
        "response_b": {"id": b_id, "text": b_text},
        "leased_at": assignment.leased_at,
        "expires_at": assignment.expires_at,
    }


def work_backlogs() -> dict:
    """(The dashboard's cockpit and GET /api/v1/backlogs/.) Work waiting, by kind: responses for the model worker, comparisons per skill, the review queue, ratings."""
    open_batches = Batch.objects.filter(status=BatchStatus.OPEN)
    slots = (TaskSlot.objects.filter(batch__in=open_batches).exclude(state=SlotState.FILLED)
             .values("domain").annotate(n=Count("id")))  # fmt: skip
    return {
        "awaiting_responses": ComparisonTask.objects.filter(status=TaskStatus.AWAITING_RESPONSES,
                                                            batch__in=open_batches).count(),  # fmt: skip
        "open_places": {row["domain"]: row["n"] for row in slots},
        "review_queue": tasks_needing_review().count(),
        "ratings_awaiting_responses": EvaluationItem.objects.filter(status="awaiting_responses").count(),
        "items_to_rate": EvaluationItem.objects.filter(status="open", campaign__status="open").count(),
    }
