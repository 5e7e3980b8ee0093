import gzip
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from annotation.services.errors import InvalidInput


class ImportFormatError(InvalidInput):
    """A bad record in an import file: names the line (or item) and the field."""

    def __init__(self, where: str, field: str, message: str):
        super().__init__(f"{where}, field {field!r}: {message}", field=field)
        self.where = where


# Tell `progress` how far the reading has come every this many lines (and at the end).
PROGRESS_EVERY = 256

# A callback told how many of the file's bytes (as stored: compressed for .gz) have been read so far.
Progress = Callable[[int], None]


def open_text(path: Path) -> TextIO:
    """The file as text, gunzipped when its name ends in .gz."""
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _bytes_read(f: TextIO) -> int:
    """How far into the file as stored a text stream of `open_text` has read (the compressed file's position
    for .gz: a GzipFile reads from its `fileobj`)."""
    return getattr(f.buffer, "fileobj", f.buffer).tell()


def jsonl_objects(path: Path, progress: Progress | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if progress is not None and lineno % PROGRESS_EVERY == 0:
                progress(_bytes_read(f))
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ImportFormatError(f"line {lineno}", "(json)", f"not valid JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise ImportFormatError(f"line {lineno}", "(json)", "expected a JSON object")
            yield lineno, obj
        if progress is not None:
            progress(_bytes_read(f))


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
