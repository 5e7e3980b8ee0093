"""Preference pairs from the platform's database, as plain records for the trainers.

The database edge of `rewards`: it reads through the annotation app's export service (the same rows an ML
engineer downloads as `native` JSONL) and hands back `PreferencePair`s or a JSONL snapshot file.
"""

import json
from collections.abc import Sequence
from pathlib import Path

from annotation.services.exports import ExportFilters, comparisons_export_lines
from rewards.data import PreferencePair


def _filters(batch: str | None, domain: str | None, split: str | None) -> ExportFilters:
    return ExportFilters(batch=batch, domain=domain, split=split)


def preference_pairs(
    *, batches: Sequence[str], domain: str | None = None, split: str | None = None, aggregate: bool = False
) -> list[PreferencePair]:
    """The comparisons of these batches (one pair per annotation, or per task by majority)."""
    pairs = []
    for batch in batches:
        for chunk in comparisons_export_lines(filters=_filters(batch, domain, split), fmt="native", aggregate=aggregate):
            for line in chunk.splitlines():
                row = json.loads(line)
                pairs.append(
                    PreferencePair(
                        dialogue=tuple(row["dialogue"]),
                        chosen=row["chosen"],
                        rejected=row["rejected"],
                        strength=row["strength"],
                        domain=row["domain"],
                        batch=row["batch"],
                        split=row["split"],
                        safety_label=row["safety_label"],
                        source="platform",
                        meta={"task_id": row["task_id"], "annotator": row["annotator"]},
                    )
                )
    return pairs


def write_training_snapshot(path: Path, *, batches: Sequence[str], domain: str | None = None) -> int:
    """Freeze the batches' comparisons into a native JSONL file (the run's exact training data); row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    rows = 0
    with tmp.open("w", encoding="utf-8") as f:
        for batch in batches:
            for chunk in comparisons_export_lines(filters=_filters(batch, domain, None), fmt="native"):
                f.write(chunk)
                rows += chunk.count("\n")
    tmp.replace(path)
    return rows
