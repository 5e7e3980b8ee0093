"""Streamed preference exports: one JSON line per annotation, or one per task (a reviewer's adjudication
where there is one, else the majority vote).

Constant memory: annotations are read in keyset-paginated chunks (by annotation id, or by task id when
aggregating), each with one query for its rows and one for the dialogue turns they need, and written out
before the next chunk is read. Items yielded are strings of one or more whole lines.
"""

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import groupby

from django.db import connection

from annotation.models import Adjudication, Annotation, Turn
from annotation.models.people import annotator_pseudonym
from annotation.scales import MARGINS, STRENGTH_RANK, Strength

from .errors import InvalidInput

FORMATS = ("native", "trl", "hh-rlhf")
CHUNK = 2000  # annotations a page
TASK_CHUNK = 700  # tasks a page when aggregating

_COLUMNS = (
    "id", "choice", "strength", "safety_label", "note", "time_on_task_ms", "too_fast", "created_at",
    "annotator_id", "task_id", "task__batch__name", "task__split", "task__domain",
    "task__dialogue__prompt__risk_category", "task__is_gold", "task__context_length", "task__dialogue_id",
    "task__annotation_count",
    "task__response_a_id", "task__response_a__text", "task__response_a__policy_version__name",
    "task__response_a__sampling",
    "task__response_b_id", "task__response_b__text", "task__response_b__policy_version__name",
    "task__response_b__sampling",
)  # fmt: skip


@dataclass(frozen=True)
class ExportFilters:
    batch: str | None = None
    domain: str | None = None
    split: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    include_gold: bool = False


def _pseudonym(user_id: int, cache: dict[int, str]) -> str:
    if user_id not in cache:
        cache[user_id] = annotator_pseudonym(user_id)
    return cache[user_id]


def _queryset(filters: ExportFilters):
    qs = Annotation.objects.all()
    if filters.batch:
        qs = qs.filter(task__batch__name=filters.batch)
    if filters.domain:
        qs = qs.filter(task__domain=filters.domain)
    if filters.split:
        qs = qs.filter(task__split=filters.split)
    if filters.created_after:
        qs = qs.filter(created_at__gte=filters.created_after)
    if filters.created_before:
        qs = qs.filter(created_at__lt=filters.created_before)
    if not filters.include_gold:
        qs = qs.filter(task__is_gold=False)
    return qs


def _turns_of(rows: list[dict]) -> dict[int, list[dict]]:
    turns: dict[int, list[dict]] = {}
    for dialogue_id, role, text in (
        Turn.objects.filter(dialogue_id__in={r["task__dialogue_id"] for r in rows})
        .order_by("dialogue_id", "position")
        .values_list("dialogue_id", "role", "text")
    ):
        turns.setdefault(dialogue_id, []).append({"role": role, "content": text})
    return turns


def _chunks(filters: ExportFilters) -> Iterator[tuple[list[dict], dict[int, list[dict]]]]:
    """Yield (rows, turns by dialogue id) chunk by chunk, in annotation order."""
    qs = _queryset(filters)
    last_id = 0
    while True:
        rows = [dict(zip(_COLUMNS, r, strict=True)) for r in qs.filter(id__gt=last_id).order_by("id").values_list(*_COLUMNS)[:CHUNK]]  # fmt: skip
        if not rows:
            return
        last_id = rows[-1]["id"]
        yield rows, _turns_of(rows)


def _task_chunks(filters: ExportFilters) -> Iterator[tuple[list[dict], dict[int, list[dict]], dict[int, tuple]]]:
    """Yield (rows, turns, adjudications by task id) for whole tasks at a time, in task order.

    Keyset pages on the task id: first the next task ids that have selected annotations, then all of
    their annotations by index lookups (a page never splits a task's votes).
    """
    qs = _queryset(filters)
    last_task = 0
    while True:
        task_ids = list(
            qs.filter(task_id__gt=last_task).order_by("task_id").values_list("task_id", flat=True).distinct()[:TASK_CHUNK]
        )
        if not task_ids:
            return
        last_task = task_ids[-1]
        rows = [dict(zip(_COLUMNS, r, strict=True)) for r in qs.filter(task_id__in=task_ids).order_by("task_id", "id").values_list(*_COLUMNS)]  # fmt: skip
        adjudications = {
            task_id: decision
            for task_id, *decision in Adjudication.objects.filter(task_id__in=task_ids).values_list(
                "task_id", "choice", "strength", "safety_label"
            )
        }
        yield rows, _turns_of(rows), adjudications


def comparisons_export_count(*, filters: ExportFilters, aggregate: bool = False) -> int:
    """How many lines an export will have, at most (aggregated: tasks with a vote; an even split is left out)."""
    qs = _queryset(filters)
    return qs.values("task_id").distinct().count() if aggregate else qs.count()


def _transcript(messages: list[dict], reply: str) -> str:
    """Anthropic's HH-RLHF transcript layout."""
    parts = [f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
    return "".join(parts) + f"\n\nAssistant: {reply}"


def _line(row: dict, context: list[dict], fmt: str, margins: dict, *, annotator: str, n_annotations: int) -> str:
    chosen_side, rejected_side = ("a", "b") if row["choice"] == "a" else ("b", "a")
    chosen = row[f"task__response_{chosen_side}__text"]
    rejected = row[f"task__response_{rejected_side}__text"]
    if fmt == "trl":
        out = {
            "prompt": context,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "margin": margins.get(row["strength"], 0.0),
            "strength": row["strength"] or None,
            "domain": row["task__domain"],
        }
    elif fmt == "hh-rlhf":
        out = {"chosen": _transcript(context, chosen), "rejected": _transcript(context, rejected)}
    else:
        out = {
            "task_id": row["task_id"],
            "batch": row["task__batch__name"],
            "split": row["task__split"] or None,
            "domain": row["task__domain"],
            "risk_category": row["task__dialogue__prompt__risk_category"] or None,
            "dialogue": context,
            **{
                f"response_{side}": {
                    "id": row[f"task__response_{side}_id"],
                    "text": row[f"task__response_{side}__text"],
                    "policy_version": row[f"task__response_{side}__policy_version__name"],
                    "sampling": row[f"task__response_{side}__sampling"],
                }
                for side in ("a", "b")
            },
            "choice": row["choice"],
            "chosen": chosen,
            "rejected": rejected,
            "strength": row["strength"] or None,
            "safety_label": row["safety_label"] or None,
            "annotator": annotator,
            "annotation_id": row["id"] if annotator not in ("majority", "adjudicated") else None,
            "n_annotations": n_annotations,
            "is_gold": row["task__is_gold"],
            "created_at": row["created_at"].astimezone(UTC).isoformat(timespec="microseconds"),
            "time_on_task_ms": row["time_on_task_ms"],
        }
    return json.dumps(out, ensure_ascii=False) + "\n"


def _majority(votes: list[dict]) -> dict | None:
    """The majority choice with the median strength of its voters; None when the vote is split evenly."""
    counts = Counter(v["choice"] for v in votes)
    (top, n_top), *rest = counts.most_common()
    if rest and rest[0][1] == n_top:
        return None
    winners = sorted(
        (v for v in votes if v["choice"] == top),
        key=lambda v: STRENGTH_RANK.get(Strength(v["strength"]), 0) if v["strength"] else 0,
    )
    row = dict(winners[(len(winners) - 1) // 2])  # lower median strength among the majority
    labels = Counter(v["safety_label"] for v in winners if v["safety_label"])
    row["safety_label"] = labels.most_common(1)[0][0] if labels else ""
    return row


def comparisons_export_lines(
    *,
    filters: ExportFilters,
    fmt: str = "native",
    margin: str = "small",
    aggregate: bool = False,
    python_renderer: bool = False,
) -> Iterator[str]:
    """JSON lines of the selected comparisons in `fmt`; with `aggregate`, one line per task: the reviewer's
    adjudication where the task has one (`annotator` "adjudicated"), else the majority vote ("majority";
    a task whose vote is split evenly and not adjudicated is left out).

    On PostgreSQL the lines are rendered by the database (`exports_sql`), several lines to a string;
    `python_renderer` forces the portable renderer (the two are tested equal).
    """
    if fmt not in FORMATS:
        raise InvalidInput(f"format must be one of {list(FORMATS)}, got {fmt!r}", field="format")
    if margin not in MARGINS:
        raise InvalidInput(f"margin must be one of {list(MARGINS)}, got {margin!r}", field="margin")
    margins = MARGINS[margin]
    if connection.vendor == "postgresql" and not python_renderer:
        from .exports_sql import export_lines_postgresql, export_task_lines_postgresql

        render = export_task_lines_postgresql if aggregate else export_lines_postgresql
        yield from render(filters=filters, fmt=fmt, margins=margins)
        return
    names: dict[int, str] = {}
    if not aggregate:
        for rows, turns in _chunks(filters):
            yield "".join(
                _line(row, turns[row["task__dialogue_id"]][: row["task__context_length"]], fmt, margins,
                      annotator=_pseudonym(row["annotator_id"], names), n_annotations=1)
                for row in rows
            )  # fmt: skip
        return
    for rows, turns, adjudications in _task_chunks(filters):
        lines = []
        for task_id, group in groupby(rows, key=lambda r: r["task_id"]):
            votes = list(group)
            context = turns[votes[0]["task__dialogue_id"]][: votes[0]["task__context_length"]]
            if task_id in adjudications:
                choice, strength, safety_label = adjudications[task_id]
                row = {**votes[0], "choice": choice, "strength": strength, "safety_label": safety_label}
                lines.append(_line(row, context, fmt, margins, annotator="adjudicated", n_annotations=len(votes)))
            elif (winner := _majority(votes)) is not None:
                lines.append(_line(winner, context, fmt, margins, annotator="majority", n_annotations=len(votes)))
        yield "".join(lines)
