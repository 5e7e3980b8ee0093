"""The per-annotation export rendered by PostgreSQL itself: the JSON of each row is built in SQL.

Same rows, same fields and values as the Python renderer in `exports` (a test holds the two equal);
Python only joins the lines. Keyset pagination on the annotation id keeps memory flat and the first
byte early.
"""

from collections.abc import Iterator

from django.conf import settings
from django.db import connection

from annotation.scales import Strength

from .exports import ExportFilters

PAGE = 5000  # rows per query after the first page

_CONTEXT = """COALESCE((SELECT json_agg(json_build_object('role', u.role, 'content', u.text) ORDER BY u.position)
    FROM annotation_turn u WHERE u.dialogue_id = t.dialogue_id AND u.position < t.context_length), '[]'::json)"""
_TRANSCRIPT = """COALESCE((SELECT string_agg(CASE WHEN u.role = 'user' THEN E'\\n\\nHuman: ' ELSE E'\\n\\nAssistant: ' END
    || u.text, '' ORDER BY u.position)
    FROM annotation_turn u WHERE u.dialogue_id = t.dialogue_id AND u.position < t.context_length), '')"""
_CHOSEN = "CASE WHEN a.choice = 'a' THEN ra.text ELSE rb.text END"
_REJECTED = "CASE WHEN a.choice = 'a' THEN rb.text ELSE ra.text END"

_RENDER = {
    "native": f"""json_build_object(
        'task_id', t.id, 'batch', b.name, 'split', NULLIF(t.split, ''), 'domain', t.domain,
        'risk_category', NULLIF(p.risk_category, ''), 'dialogue', {_CONTEXT},
        'response_a', json_build_object('id', ra.id, 'text', ra.text, 'policy_version', pa.name, 'sampling', ra.sampling),
        'response_b', json_build_object('id', rb.id, 'text', rb.text, 'policy_version', pb.name, 'sampling', rb.sampling),
        'choice', a.choice, 'chosen', {_CHOSEN}, 'rejected', {_REJECTED},
        'strength', NULLIF(a.strength, ''), 'safety_label', NULLIF(a.safety_label, ''),
        'annotator', 'ann-' || left(encode(sha256(convert_to(%(salt)s || ':' || a.annotator_id::text, 'UTF8')), 'hex'), 12),
        'annotation_id', a.id, 'n_annotations', 1, 'is_gold', t.is_gold,
        'created_at', to_char(a.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
        'time_on_task_ms', a.time_on_task_ms)""",
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
  FROM annotation_annotation a
  JOIN annotation_comparisontask t ON t.id = a.task_id
  JOIN annotation_batch b ON b.id = t.batch_id
  JOIN annotation_dialogue d ON d.id = t.dialogue_id
  JOIN annotation_prompt p ON p.id = d.prompt_id
  JOIN annotation_response ra ON ra.id = t.response_a_id
  JOIN annotation_policyversion pa ON pa.id = ra.policy_version_id
  JOIN annotation_response rb ON rb.id = t.response_b_id
  JOIN annotation_policyversion pb ON pb.id = rb.policy_version_id
"""


def _where(filters: ExportFilters) -> tuple[str, dict]:
    clauses, params = ["a.id > %(after)s"], {}
    if filters.batch:
        clauses.append("b.name = %(batch)s")
        params["batch"] = filters.batch
    if filters.domain:
        clauses.append("t.domain = %(domain)s")
        params["domain"] = filters.domain
    if filters.split:
        clauses.append("t.split = %(split)s")
        params["split"] = filters.split
    if filters.created_after:
        clauses.append("a.created_at >= %(created_after)s")
        params["created_after"] = filters.created_after
    if filters.created_before:
        clauses.append("a.created_at < %(created_before)s")
        params["created_before"] = filters.created_before
    if not filters.include_gold:
        clauses.append("NOT t.is_gold")
    return " AND ".join(clauses), params


def export_lines_postgresql(*, filters: ExportFilters, fmt: str, margins: dict) -> Iterator[str]:
    """JSON lines rendered by PostgreSQL, chunk by chunk in annotation id order."""
    where, params = _where(filters)
    params["salt"] = settings.ANNOTATOR_PSEUDONYM_SALT
    for i, strength in enumerate(Strength, start=1):
        params[f"m{i}"], params[f"v{i}"] = strength.value, float(margins[strength])
    sql = f"SELECT a.id, ({_RENDER[fmt]})::text {_FROM} WHERE {where} ORDER BY a.id LIMIT %(limit)s"
    after, limit = 0, 200  # a small first page: the first byte goes out at once
    with connection.cursor() as cursor:
        while True:
            cursor.execute(sql, {**params, "after": after, "limit": limit})
            rows = cursor.fetchall()
            if not rows:
                return
            after, limit = rows[-1][0], PAGE
            yield "".join(f"{text}\n" for _, text in rows)
