"""Reading data files so that every failure names the file, and the line or record where there is one.

Readers call these instead of `open`/`json.load`/`yaml.safe_load`, so a truncated, empty or
non-UTF-8 file gives one line such as

    ASC file '/data/asc/Bing3Domains/asc/Speaker/train.json' is not valid JSON (truncated or corrupt?):
    Expecting value at line 5, column 6

rather than a bare `Expecting value: line 1 column 1 (char 0)`. Missing files raise
DataNotFoundError, bad contents DataFormatError (a ValueError); the CLI prints either as
`mmcl: error: <message>`.
"""
from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

from mmcl.data import DataFormatError, DataNotFoundError

GZIP_MAGIC = b"\x1f\x8b"  # never the start of UTF-8 text (0x8b is a continuation byte)


def json_type(value: Any) -> str:
    """JSON's name for a parsed value's type, with an article: 'an array', 'a string', ..."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null" if value is None else type(value).__name__


def _position(raw: bytes, pos: int) -> str:
    line = raw.count(b"\n", 0, pos) + 1
    column = pos - (raw.rfind(b"\n", 0, pos) + 1) + 1
    return f"line {line}, column {column} (byte offset {pos})"


def read_bytes(path: str | Path, what: str) -> bytes:
    """The bytes of a file; a missing file is a DataNotFoundError naming it as `what`."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataNotFoundError(f"{what} '{path}' does not exist") from None
    except IsADirectoryError:
        raise DataFormatError(f"{what} '{path}' is a directory, not a file") from None
    except OSError as e:
        raise DataFormatError(f"{what} '{path}' cannot be read: {e.strerror or e}") from e


def gunzip(raw: bytes, path: str | Path, what: str, error: type[DataFormatError] = DataFormatError) -> bytes:
    """Decompress gzip data read from `path`; corrupt or truncated data raise `error` naming the file."""
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise error(f"{what} '{path}': corrupt or truncated gzip data ({type(e).__name__}: {e})") from None


def decode_utf8(raw: bytes, path: str | Path, what: str, note: str = "") -> str:
    """`raw` as UTF-8 text; a bad byte is reported with its line, column and byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(
            f"{what} '{path}' is not UTF-8 text: byte 0x{raw[e.start]:02x} at {_position(raw, e.start)}{note}"
        ) from None


def read_text_file(path: str | Path, what: str, *, allow_empty: bool = False) -> str:
    """A UTF-8 text file (gzipped or not, told by its content), as one string.

    Raises DataNotFoundError if it is missing and DataFormatError if it is not UTF-8, is corrupt
    gzip, or (unless allow_empty) holds nothing but whitespace.
    """
    raw = read_bytes(path, what)
    note = ""
    if raw[:2] == GZIP_MAGIC:
        raw, note = gunzip(raw, path, what), " of the decompressed data"
    text = decode_utf8(raw, path, what, note)
    if not allow_empty and not text.strip():
        raise DataFormatError(f"{what} '{path}' is empty")
    return text


def iter_lines(path: str | Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of a large UTF-8 text file, read as a stream.

    Splits on '\\n' only (text may hold other line-break characters); a trailing '\\r' is removed.
    An empty (or all-blank) file raises DataFormatError once the end is reached.
    """
    path = Path(path)
    if not path.is_file():
        read_bytes(path, what)  # the same errors as for a whole-file read
    offset, seen = 0, False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(
                    f"{what} '{path}' is not UTF-8 text: byte 0x{raw[e.start]:02x} at line {lineno}, "
                    f"column {e.start + 1} (byte offset {offset + e.start})"
                ) from None
            offset += len(raw)
            line = line.rstrip("\n").rstrip("\r")
            seen = seen or bool(line.strip())
            yield lineno, line
    if not seen:
        raise DataFormatError(f"{what} '{path}' is empty")


def parse_json(text: str, where: str, one_line: bool = False) -> Any:
    """json.loads with the error saying where: `where` names the file, or (one_line) the file and line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if one_line else f"line {e.lineno}, column {e.colno}"
        raise DataFormatError(f"{where} is not valid JSON (truncated or corrupt?): {e.msg} ({at})") from None


def read_json_file(path: str | Path, what: str, top: type | tuple[type, ...] | None = dict,
                   top_desc: str = "an object of records") -> Any:
    """A UTF-8 JSON file; `top` is the type the top level must have (None: any), `top_desc` says what it is."""
    data = parse_json(read_text_file(path, what), f"{what} '{path}'")
    if top is not None and not isinstance(data, top):
        raise DataFormatError(f"{what} '{path}': the top level is {json_type(data)}, expected {top_desc}")
    return data


def record(rec: Any, where: str, fields: Sequence[str] = (), strings: Sequence[str] = ()) -> dict:
    """Check one record (a JSON object) at `where` ("<what> '<path>', record 'k'"): it has `fields`,
    and the `strings` fields hold strings."""
    if not isinstance(rec, dict):
        raise DataFormatError(f"{where} is {json_type(rec)}, expected an object with the fields {', '.join(fields)}")
    missing = [f for f in fields if f not in rec]
    if missing:
        raise DataFormatError(
            f"{where} lacks the field{'s' if len(missing) > 1 else ''} {', '.join(repr(f) for f in missing)} "
            f"(it has {', '.join(repr(k) for k in rec) or 'none'})"
        )
    for f in strings:
        if not isinstance(rec[f], str):
            raise DataFormatError(f"{where}: field '{f}' is {json_type(rec[f])}, expected a string")
    return rec


def read_yaml_file(path: str | Path, what: str) -> Any:
    """A UTF-8 YAML file parsed with yaml.safe_load; syntax errors name the file, line and column."""
    import yaml

    text = read_text_file(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).replace("\n", " ")
        context = getattr(e, "context", None)
        raise DataFormatError(
            f"{what} '{path}' is not valid YAML: {problem}{where}" + (f" ({context})" if context else "")
        ) from None
