"""PandaLM's test set: instruction (+ input), two responses, three human labels (1, 2, or 0 = tie).

Strength from the three annotators' consensus (each annotator who picked a side gets it):
all three agree -> significantly better; two agree and one calls a tie -> better; two agree and one
disagrees -> slightly better. A tie vote counts as "negligibly better / unsure" for the majority side.
Items with no majority (all ties, or one each way) carry no preference and are left out.
"""

from pathlib import Path

from annotation.services.errors import InvalidInput
from annotation.services.imports import ComparisonRecord, ResponseRecord, VoteRecord
from annotation.validation import parse_json

from .common import (
    ImportFormatError,
    Progress,
    Skipped,
    check_storable,
    open_text,
    read_all,
    require_str,
    risk_for,
)

LABELS = {1: "a", 2: "b", 0: None}


def consensus_strength(sides: list[str | None], majority: str) -> str:
    agree = sum(s == majority for s in sides)
    ties = sum(s is None for s in sides)
    if agree == 3:
        return "significantly_better"
    if agree == 2 and ties == 1:
        return "better"
    if agree == 2:
        return "slightly_better"
    return "negligibly_better"  # one vote for the side, two ties


def parse(
    path: Path, *, domain: str, skip_invalid: bool = False, skipped: Skipped | None = None,
    progress: Progress | None = None,
) -> list[ComparisonRecord]:
    skipped = Skipped() if skipped is None else skipped
    with open_text(path) as f:
        text = read_all(f)  # one JSON array: read whole, so the bar moves once
    try:
        items = parse_json(text, what="the file")
    except InvalidInput as e:
        raise ImportFormatError("top level", "(json)", e.message) from None
    if progress is not None:
        progress(path.stat().st_size)
    if not isinstance(items, list):
        raise ImportFormatError("top level", "(json)", "expected a JSON array of items")
    records = []
    for i, item in enumerate(items):
        try:
            record = _record(i, item, domain)
        except ImportFormatError as e:
            skipped.guard(skip_invalid, e)
            continue
        if record is not None:
            records.append(record)
    return records


def _record(i: int, item, domain: str) -> ComparisonRecord | None:
    where = f"item {i}"
    if not isinstance(item, dict):
        raise ImportFormatError(where, "(json)", "expected an object")
    check_storable(item, where)
    instruction = require_str(item, "instruction", where)
    prompt = instruction + (
        f"\n\n{item['input']}" if isinstance(item.get("input"), str) and item["input"].strip() else ""
    )
    models = str(item.get("cmp_key", "")).split("_")
    if len(models) != 2:
        raise ImportFormatError(where, "cmp_key", "expected 'modelA_modelB'")
    sides = []
    for k in ("annotator1", "annotator2", "annotator3"):
        if item.get(k) not in LABELS:
            raise ImportFormatError(where, k, f"expected 0, 1 or 2, got {item.get(k)!r}")
        sides.append(LABELS[item[k]])
    n_a, n_b = sides.count("a"), sides.count("b")
    if n_a == n_b:
        return None  # no majority: no preference to learn from
    majority = "a" if n_a > n_b else "b"
    strength = consensus_strength(sides, majority)
    votes = tuple(
        VoteRecord(
            annotator=f"pandalm:annotator{j + 1}",
            choice=side or majority,
            strength=strength if side else "negligibly_better",
        )
        for j, side in enumerate(sides)
    )
    return ComparisonRecord(
        turns=(("user", prompt),),
        response_a=ResponseRecord(require_str(item, "response1", where), f"pandalm:{models[0]}"),
        response_b=ResponseRecord(require_str(item, "response2", where), f"pandalm:{models[1]}"),
        domain=domain,
        risk_category=risk_for(domain),
        votes=votes,
        source="pandalm",
        origin=where,
    )
