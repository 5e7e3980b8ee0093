"""The per-annotation export rendered by PostgreSQL itself: the JSON of each row is built in SQL.

Same rows, same fields and values as the Python renderer in `exports` (a test holds the two equal);
Python only joins the lines. Keyset pagination on the annotation id keeps memory flat and the first
byte early.
"""

from collections.abc import Iterator

from django.conf import settings
from django.db import connection

from annotation.scales import STRENGTH_RANK, Strength

from .exports import ExportFilters

PAGE = 5000  # rows per query after the first page

_CONTEXT = """COALESCE((SELECT json_agg(json_build_object('role', u.role, 'content', u.text) ORDER BY u.position)
    FROM annotation_turn u WHERE u.dialogue_id = t.dialogue_id AND u.position < t.context_length), '[]'::json)"""
_TRANSCRIPT = """COALESCE((SELECT string_agg(CASE WHEN u.role = 'user' THEN E'\\n\\nHuman: ' ELSE E'\\n\\nAssistant: ' END
    || u.text, '' ORDER BY u.position)
    FROM annotation_turn u WHERE u.dialogue_id = t.dialogue_id AND u.position < t.context_length), '')"""
_CHOSEN = "CASE WHEN a.choice = 'a' THEN ra.text ELSE rb.text END"
_REJECTED = "CASE WHEN a.choice = 'a' THEN rb.text ELSE ra.text END"

_NATIVE = """json_build_object(
        'task_id', t.id, 'batch', b.name, 'split', NULLIF(t.split, ''), 'domain', t.domain,
        'risk_category', NULLIF(p.risk_category, ''), 'dialogue', {context},
        'response_a', json_build_object('id', ra.id, 'text', ra.text, 'policy_version', pa.name, 'sampling', ra.sampling),
        'response_b', json_build_object('id', rb.id, 'text', rb.text, 'policy_version', pb.name, 'sampling', rb.sampling),
        'choice', a.choice, 'chosen', {chosen}, 'rejected', {rejected},
        'strength', NULLIF(a.strength, ''), 'safety_label', NULLIF(a.safety_label, ''),
        'annotator', {annotator}, 'annotation_id', {annotation_id}, 'n_annotations', {n_annotations}, 'is_gold', t.is_gold,
        'created_at', to_char(a.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
        'time_on_task_ms', a.time_on_task_ms)"""
# Who the line speaks for: one pseudonymous annotator, or (aggregated) the majority or an adjudication.
_ONE_ANNOTATOR = dict(
    annotator="'ann-' || left(encode(sha256(convert_to(%(salt)s || ':' || a.annotator_id::text, 'UTF8')), 'hex'), 12)",
    annotation_id="a.id",
    n_annotations="1",
)
_PER_TASK = dict(annotator="a.kind", annotation_id="NULL::bigint", n_annotations="a.n_votes")

_RENDER = {
    "native": _NATIVE.format(context=_CONTEXT, chosen=_CHOSEN, rejected=_REJECTED, **_ONE_ANNOTATOR),
    "native-per-task": _NATIVE.format(context=_CONTEXT, chosen=_CHOSEN, rejected=_REJECTED, **_PER_TASK),
    "trl": f"""json_build_object(
        'prompt', {_CONTEXT},
        'chosen', json_build_array(json_build_object('role', 'assistant', 'content', {_CHOSEN})),
        'rejected', json_build_array(json_build_object('role', 'assistant', 'content', {_REJECTED})),
        'margin', CASE a.strength WHEN %(m1)s THEN %(v1)s WHEN %(m2)s THEN %(v2)s WHEN %(m3)s THEN %(v3)s
                  WHEN %(m4)s THEN %(v4)s ELSE 0.0 END,
        'strength', NULLIF(a.strength, ''), 'domain', t.domain)""",
    "hh-rlhf": f"""json_build_object(
        'chosen', {_TRANSCRIPT} || E'\\n\\nAssistant: ' || {_CHOSEN},
        'rejected', {_TRANSCRIPT} || E'\\n\\nAssistant: ' || {_REJECTED})""",
}

_FROM = """
  FROM {source} a
  JOIN annotation_comparisontask t ON t.id = a.task_id
  JOIN annotation_batch b ON b.id = t.batch_id
  JOIN annotation_dialogue d ON d.id = t.dialogue_id
  JOIN annotation_prompt p ON p.id = d.prompt_id
  JOIN annotation_response ra ON ra.id = t.response_a_id
  JOIN annotation_policyversion pa ON pa.id = ra.policy_version_id
  JOIN annotation_response rb ON rb.id = t.response_b_id
  JOIN annotation_policyversion pb ON pb.id = rb.policy_version_id
"""


def _clauses(filters: ExportFilters) -> tuple[list[str], list[str], dict]:
    """The filters as SQL: clauses on the task (aliases t, b), clauses on the annotation (a), parameters."""
    on_task, on_annotation, params = [], [], {}
    if filters.batch:
        on_task.append("b.name = %(batch)s")
        params["batch"] = filters.batch
    if filters.domain:
        on_task.append("t.domain = %(domain)s")
        params["domain"] = filters.domain
    if filters.split:
        on_task.append("t.split = %(split)s")
        params["split"] = filters.split
    if not filters.include_gold:
        on_task.append("NOT t.is_gold")
    if filters.created_after:
        on_annotation.append("a.created_at >= %(created_after)s")
        params["created_after"] = filters.created_after
    if filters.created_before:
        on_annotation.append("a.created_at < %(created_before)s")
        params["created_before"] = filters.created_before
    return on_task, on_annotation, params


def _where(filters: ExportFilters) -> tuple[str, dict]:
    on_task, on_annotation, params = _clauses(filters)
    return " AND ".join(["a.id > %(after)s", *on_task, *on_annotation]), params


def _params(margins: dict) -> dict:
    params = {"salt": settings.ANNOTATOR_PSEUDONYM_SALT}
    for i, strength in enumerate(Strength, start=1):
        params[f"m{i}"], params[f"v{i}"] = strength.value, float(margins[strength])
    return params


def export_lines_postgresql(*, filters: ExportFilters, fmt: str, margins: dict) -> Iterator[str]:
    """JSON lines rendered by PostgreSQL, chunk by chunk in annotation id order."""
    where, params = _where(filters)
    params.update(_params(margins))
    sql = f"SELECT a.id, ({_RENDER[fmt]})::text {_FROM.format(source='annotation_annotation')} WHERE {where} ORDER BY a.id LIMIT %(limit)s"  # noqa: E501
    after, limit = 0, 200  # a small first page: the first byte goes out at once
    with connection.cursor() as cursor:
        while True:
            cursor.execute(sql, {**params, "after": after, "limit": limit})
            rows = cursor.fetchall()
            if not rows:
                return
            after, limit = rows[-1][0], PAGE
            yield "".join(f"{text}\n" for _, text in rows)


# One row per task, shaped like an annotation row: the reviewer's adjudication over the first vote where the
# task has one, else the majority's median-strength vote (the lower median; ties in strength by annotation
# id) with the winners' most common safety label (ties: the first in that order), as `exports._majority`.
_RANK = "CASE a.strength " + " ".join(f"WHEN '{s.value}' THEN {rank}" for s, rank in STRENGTH_RANK.items()) + " ELSE 0 END"
_PER_TASK_SOURCE = f"""(
  WITH v AS (
    SELECT a.id, a.task_id, a.choice, a.strength, a.safety_label, a.annotator_id, a.created_at, a.time_on_task_ms,
           {_RANK} AS r
    FROM annotation_annotation a JOIN annotation_comparisontask t ON t.id = a.task_id
    JOIN annotation_batch b ON b.id = t.batch_id
    WHERE a.task_id = ANY(%(tasks)s) AND {{where}}
  ), counts AS (
    SELECT task_id, count(*) AS n, count(*) FILTER (WHERE choice = 'a') AS ca, count(*) FILTER (WHERE choice = 'b') AS cb
    FROM v GROUP BY task_id
  ), w AS (
    SELECT v.*, c.n, row_number() OVER (PARTITION BY v.task_id ORDER BY v.r, v.id) AS pos,
           count(*) OVER (PARTITION BY v.task_id) AS nw
    FROM v JOIN counts c USING (task_id)
    WHERE c.ca <> c.cb AND v.choice = CASE WHEN c.ca > c.cb THEN 'a' ELSE 'b' END
      AND NOT EXISTS (SELECT 1 FROM annotation_adjudication j WHERE j.task_id = v.task_id)
  ), safety AS (
    SELECT DISTINCT ON (task_id) task_id, safety_label FROM (
      SELECT task_id, safety_label, count(*) AS c, min(pos) AS first FROM w WHERE safety_label <> ''
      GROUP BY task_id, safety_label) s
    ORDER BY task_id, c DESC, first
  )
  SELECT w.id, w.task_id, w.choice, w.strength, COALESCE(s.safety_label, '') AS safety_label, w.annotator_id,
         w.created_at, w.time_on_task_ms, w.n AS n_votes, 'majority' AS kind
  FROM w LEFT JOIN safety s USING (task_id) WHERE w.pos = (w.nw - 1) / 2 + 1
  UNION ALL
  (SELECT DISTINCT ON (v.task_id) v.id, v.task_id, j.choice, j.strength, j.safety_label, v.annotator_id,
          v.created_at, v.time_on_task_ms, c.n, 'adjudicated'
   FROM v JOIN counts c USING (task_id) JOIN annotation_adjudication j ON j.task_id = v.task_id
   ORDER BY v.task_id, v.id)
)"""


def export_task_lines_postgresql(*, filters: ExportFilters, fmt: str, margins: dict) -> Iterator[str]:
    """One JSON line per task (adjudication, else majority), rendered by PostgreSQL, pages of whole tasks."""
    on_task, on_annotation, params = _clauses(filters)
    params.update(_params(margins))
    # The next tasks with a selected vote, walking the task primary key.
    page_sql = f"""SELECT t.id FROM annotation_comparisontask t JOIN annotation_batch b ON b.id = t.batch_id
        WHERE {" AND ".join(["t.id > %(after)s", *on_task])}
          AND EXISTS (SELECT 1 FROM annotation_annotation a WHERE {" AND ".join(["a.task_id = t.id", *on_annotation])})
        ORDER BY t.id LIMIT %(limit)s"""  # fmt: skip
    source = _PER_TASK_SOURCE.format(where=" AND ".join(["TRUE", *on_task, *on_annotation]))
    render = _RENDER["native-per-task" if fmt == "native" else fmt]
    sql = f"SELECT a.task_id, ({render})::text {_FROM.format(source=source)}"
    after, limit = 0, 100  # a small first page: the first byte goes out at once
    with connection.cursor() as cursor:
        while True:
            cursor.execute(page_sql, {**params, "after": after, "limit": limit})
            tasks = [task_id for (task_id,) in cursor.fetchall()]
            if not tasks:
                return
            after, limit = tasks[-1], PAGE
            cursor.execute(sql, {**params, "tasks": tasks})
            yield "".join(f"{text}\n" for _, text in sorted(cursor.fetchall(), key=lambda row: row[0]))
