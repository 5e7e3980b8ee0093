import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from annotation.services.errors import InvalidInput


class ImportFormatError(InvalidInput):
    """A bad record in an import file: names the line (or item) and the field."""

    def __init__(self, where: str, field: str, message: str):
        super().__init__(f"{where}, field {field!r}: {message}", field=field)
        self.where = where


def open_text(path: Path):
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ImportFormatError(f"line {lineno}", "(json)", f"not valid JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise ImportFormatError(f"line {lineno}", "(json)", "expected a JSON object")
            yield lineno, obj


def require_str(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ImportFormatError(where, key, "missing or not a non-empty string")
    return value


def risk_for(domain: str) -> str:
    """Imported safety data without a category of ours is `uncategorized`."""
    return "uncategorized" if domain == "safety" else ""


class Skipped(list):
    """Records left out under `skip_invalid`, as (where, message) pairs."""

    def guard(self, skip_invalid: bool, error: ImportFormatError) -> None:
        if not skip_invalid:
            raise error
        self.append((error.where, error.message))
