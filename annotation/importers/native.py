"""The platform's own `native` export, one line per annotation: re-imported as tasks with their votes."""

from pathlib import Path

from annotation.services.imports import ComparisonRecord, ResponseRecord, VoteRecord

from .common import ImportFormatError, Progress, Skipped, check_storable, jsonl_objects, require_str


def _response(obj: dict, key: str, where: str) -> ResponseRecord:
    r = obj.get(key)
    if not isinstance(r, dict):
        raise ImportFormatError(where, key, "expected an object with text and policy_version")
    sampling = r.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise ImportFormatError(where, f"{key}.sampling", "expected an object")
    return ResponseRecord(
        require_str(r, "text", where), r.get("policy_version") or "native:unknown", sampling
    )


def parse(
    path: Path, *, domain: str | None = None, skip_invalid: bool = False, skipped: Skipped | None = None,
    progress: Progress | None = None,
) -> list[ComparisonRecord]:
    """Rows of one task (same task_id) become one record; `domain` overrides the rows' own if given."""
    tasks: dict[object, dict] = {}
    skipped = Skipped() if skipped is None else skipped
    for lineno, obj in jsonl_objects(path, progress):
        try:
            _add_row(tasks, lineno, obj, domain)
        except ImportFormatError as e:
            skipped.guard(skip_invalid, e)
    return _records(tasks)


def _add_row(tasks: dict, lineno: int, obj: dict, domain: str | None) -> None:
    where = f"line {lineno}"
    check_storable(obj, where)
    dialogue = obj.get("dialogue")
    if not isinstance(dialogue, list) or not all(isinstance(m, dict) for m in dialogue):
        raise ImportFormatError(where, "dialogue", "expected a list of {role, content} messages")
    turns = tuple((m.get("role"), m.get("content") or "") for m in dialogue)
    if obj.get("choice") not in ("a", "b"):
        raise ImportFormatError(where, "choice", f"expected 'a' or 'b', got {obj.get('choice')!r}")
    vote = VoteRecord(
        annotator=f"native:{require_str(obj, 'annotator', where)}",
        choice=obj["choice"],
        strength=obj.get("strength") or "",
        safety_label=obj.get("safety_label") or "",
        time_on_task_ms=obj.get("time_on_task_ms") if isinstance(obj.get("time_on_task_ms"), int) else None,
    )
    key = obj.get("task_id", f"line-{lineno}")
    if key not in tasks:
        tasks[key] = {
            "turns": turns,
            "a": _response(obj, "response_a", where),
            "b": _response(obj, "response_b", where),
            "domain": domain or require_str(obj, "domain", where),
            "risk": obj.get("risk_category") or "",
            "votes": [],
            "where": where,
        }
    tasks[key]["votes"].append(vote)


def _records(tasks: dict) -> list[ComparisonRecord]:
    records = []
    for t in tasks.values():
        risk = t["risk"] or ("uncategorized" if t["domain"] == "safety" else "")
        records.append(
            ComparisonRecord(
                turns=t["turns"],
                response_a=t["a"],
                response_b=t["b"],
                domain=t["domain"],
                risk_category=risk if t["domain"] == "safety" else "",
                votes=tuple(t["votes"]),
                source="native",
                origin=t["where"],
            )
        )
    return records
