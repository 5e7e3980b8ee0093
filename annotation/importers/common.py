import gzip
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from annotation.services.errors import InvalidInput
from annotation.validation import check_request_json, parse_json


class ImportFormatError(InvalidInput):
    """A bad record in an import file: names the line (or item) and the field."""

    def __init__(self, where: str, field: str, message: str):
        super().__init__(f"{where}, field {field!r}: {message}", field=field)
        self.where = where


# Tell `progress` how far the reading has come every this many lines (and at the end).
PROGRESS_EVERY = 256

# A callback told how many of the file's bytes (as stored: compressed for .gz) have been read so far.
Progress = Callable[[int], None]


class FileUnreadable(InvalidInput):
    """The file itself cannot be read (cut short, not gzip, not UTF-8): no record of it can be trusted, so
    this stops the import even with --skip-invalid."""


def _unreadable(error: Exception, where: str) -> FileUnreadable:
    if isinstance(error, EOFError):
        why = "the file ends in the middle of its compressed data (a truncated .gz)"
    elif isinstance(error, gzip.BadGzipFile | zlib.error):
        why = f"the file is not valid gzip data ({error})"
    elif isinstance(error, UnicodeDecodeError):
        why = f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at column {error.start + 1})"
    else:
        why = f"the file cannot be read ({error})"
    return FileUnreadable(f"{where}: {why}" if where else why, field="(file)")


# What reading a file (gunzipping, decoding) can raise.
UNREADABLE = (EOFError, zlib.error, UnicodeDecodeError, OSError)


def open_text(path: Path) -> TextIO:
    """The file as text, gunzipped when its name ends in .gz (read errors: see `read_all`)."""
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def read_all(f: TextIO) -> str:
    """The whole text of a file of `open_text`, or FileUnreadable saying what is wrong with it."""
    try:
        return f.read()
    except UNREADABLE as e:
        raise _unreadable(e, "") from None


def _open_binary(path: Path) -> BinaryIO:
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file")
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _bytes_read(f: BinaryIO) -> int:
    """How far into the file as stored a stream of `_open_binary` has read (the compressed file's position for
    .gz: a GzipFile reads from its `fileobj`)."""
    return getattr(f, "fileobj", f).tell()


def _lines(f: BinaryIO) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded one line at a time so that an error names its line."""
    lineno = 0
    while True:
        try:
            raw = f.readline()
        except UNREADABLE as e:
            raise _unreadable(e, f"line {lineno + 1}") from None
        if not raw:
            return
        lineno += 1
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _unreadable(e, f"line {lineno}") from None


def jsonl_objects(path: Path, progress: Progress | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error."""
    with _open_binary(path) as f:
        for lineno, line in _lines(f):
            if progress is not None and lineno % PROGRESS_EVERY == 0:
                progress(_bytes_read(f))
            if not line.strip():
                continue
            try:
                obj = parse_json(line, what="the line")
            except InvalidInput as e:
                raise ImportFormatError(f"line {lineno}", "(json)", e.message) from None
            if not isinstance(obj, dict):
                raise ImportFormatError(f"line {lineno}", "(json)", "expected a JSON object")
            yield lineno, obj
        if progress is not None:
            progress(_bytes_read(f))


def check_storable(obj, where: str) -> None:
    """ImportFormatError naming the field of the first unstorable key or text in a record (a NUL, a lone
    surrogate: annotation.validation), at any depth."""
    try:
        check_request_json(obj)
    except InvalidInput as e:
        raise ImportFormatError(where, e.field or "(json)", e.message) from None


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
