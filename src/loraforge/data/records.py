"""Reading records and turning them into conversations.

Sources: a list of dicts, a JSON array file, a JSONL file or a ``datasets.Dataset``. Formats:
alpaca (``instruction``/``input``/``output``, optional ``system`` and ``history``), OpenAI
``messages`` and ShareGPT ``conversations``. Every problem is a
[`DataError`][loraforge.DataError] naming the file, line or record, the field and what is valid.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loraforge.errors import DataError

__all__ = ["RecordFormat", "check_records", "detect_format", "load_records", "to_messages"]

RecordFormat = Literal["auto", "alpaca", "messages", "sharegpt"]

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class RawRecord:
    index: int
    line: int | None
    value: Any
    raw: str | None = None  # the line's text as read, for a record of a JSONL file


@dataclass(frozen=True, slots=True)
class Renamed:
    """Records of ``source`` (anything :func:`load_records` reads) with their fields renamed:
    ``columns`` maps loraforge's field name (``instruction``, ``messages``...) to the source's
    (e.g. ``{"instruction": "question", "output": "answer"}``). ``name`` names the source in
    errors and reports. Lines and indices stay those of ``source``."""

    source: Any
    columns: Mapping[str, str]
    name: str | None = None

    def rename(self, value: Any) -> Any:
        if not isinstance(value, Mapping) or not self.columns:
            return value
        theirs = set(self.columns.values())
        out = {k: v for k, v in value.items() if k not in theirs}
        for ours, their in self.columns.items():
            if their in value:
                out[ours] = value[their]
        return out


def source_name(source: Any) -> str:
    if isinstance(source, Renamed):
        return source.name or source_name(source.source)
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__}>"


def load_records(source: Any) -> Iterator[tuple[int, int | None, Any]]:
    """Yield ``(index, line, record)`` from a list of dicts, a JSON array file, a JSONL file or a
    ``datasets.Dataset``. ``line`` is the 1-based line in a JSONL file, else ``None``.

    Raises:
        DataError: the file does not exist, is not UTF-8, or holds invalid JSON (with its line).
    """
    for rec in _iter_records(source):
        yield rec.index, rec.line, rec.value


def _iter_records(source: Any) -> Iterator[RawRecord]:
    if isinstance(source, Renamed):
        for rec in _iter_records(source.source):
            yield RawRecord(rec.index, rec.line, source.rename(rec.value), rec.raw)
        return
    if isinstance(source, (str, os.PathLike)):
        yield from _read_file(Path(source))
        return
    if isinstance(source, Mapping):
        raise DataError(
            "expected a sequence of records (list of dicts), a file path or a datasets.Dataset, "
            "got a single mapping",
            source=source_name(source),
        )
    if not isinstance(source, Iterable):
        raise DataError(
            "expected a list of records, a .json/.jsonl path or a datasets.Dataset, "
            f"got {type(source).__name__}",
            source=source_name(source),
        )
    for i, value in enumerate(source):
        yield RawRecord(i, None, value)


#: Suffixes of formats that are not JSON: refused by name instead of failing as "invalid JSONL".
#: Any other suffix (.txt, none...) is read as a JSON array when it starts with "[", else JSONL.
_NOT_JSON = frozenset(
    {".csv", ".tsv", ".xlsx", ".xls", ".parquet", ".arrow", ".feather", ".pkl", ".pickle"}
    | {".gz", ".zip", ".bz2", ".xz", ".zst", ".yaml", ".yml"}
)


def _read_file(path: Path) -> Iterator[RawRecord]:
    name = str(path)
    if not path.exists():
        raise DataError("no such file (give a .json array or a .jsonl file)", source=name)
    if path.is_dir():
        raise DataError("is a folder; give a .json array or a .jsonl file", source=name)
    if path.suffix.lower() in _NOT_JSON:
        raise DataError(
            f"{path.suffix} files are not read; loraforge reads a .json file holding an array of "
            "records, or a .jsonl file with one JSON record per line (convert a table with "
            "pandas: .to_json('data.jsonl', orient='records', lines=True, force_ascii=False))",
            source=name,
        )
    with open(path, "rb") as f:
        head = f.read(_PEEK)
        bom = 3 if head.startswith(b"\xef\xbb\xbf") else 0
        while head[bom:].isspace() and (more := f.read(_PEEK)):  # find the first non-space
            head += more
        first = head[bom:].lstrip()[:1]
        suffix = path.suffix.lower()
        if suffix == ".jsonl" or (suffix != ".json" and first != b"["):
            f.seek(bom)
            yield from _read_jsonl(f, name, bom)
            return
        f.seek(0)
        raw = f.read()
    try:
        text = str(memoryview(raw)[bom:], "utf-8")  # no copy of the bytes
    except UnicodeDecodeError as exc:
        line = raw[: bom + exc.start].count(b"\n") + 1
        raise DataError(
            f"not valid UTF-8 (byte {bom + exc.start}); save the file as UTF-8",
            source=name,
            line=line,
        ) from None
    del raw  # a generator keeps its locals alive: hold the text only
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"invalid JSON ({exc.msg} at column {exc.colno})", source=name, line=exc.lineno
        ) from None
    except RecursionError:
        raise DataError("JSON nested too deeply to read", source=name) from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise DataError(f"unreadable JSON ({_json_problem(exc)})", source=name) from None
    if not isinstance(value, list):
        raise DataError(
            f"expected a JSON array of records at the top level, got {type(value).__name__} "
            "(for one record per line use a .jsonl file)",
            source=name,
        )
    for i, rec in enumerate(value):
        yield RawRecord(i, None, rec)


_PEEK = 1 << 16


def _read_jsonl(f: Any, name: str, offset: int) -> Iterator[RawRecord]:
    """The records of a JSONL file, read one line at a time: the file is never in memory whole
    (lines split on ``"\\n"`` only, as the bytes of a binary file iterate)."""
    index = 0
    for lineno, data in enumerate(f, 1):
        try:
            row = data.decode("utf-8").removesuffix("\n")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"not valid UTF-8 (byte {offset + exc.start}); save the file as UTF-8",
                source=name,
                line=lineno,
            ) from None
        offset += len(data)
        if not row or row.isspace():
            continue
        try:
            value = json.loads(row)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"invalid JSON ({exc.msg} at column {exc.colno}); each line of a JSONL file "
                "must be one JSON object",
                source=name,
                line=lineno,
            ) from None
        except (ValueError, RecursionError) as exc:  # e.g. a 5000-digit integer, [[[[...
            raise DataError(
                f"unreadable JSON ({_json_problem(exc)})", source=name, line=lineno
            ) from None
        yield RawRecord(index, lineno, value, row)
        index += 1


_LEADING_SPACE = re.compile(r"\s*")  # what str.lstrip() strips
_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, every surrogate is unpaired


def _json_problem(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply to read"
    return str(exc).split(";")[0]


# --------------------------------------------------------------------------- records -> messages


def detect_format(record: Any) -> Literal["alpaca", "messages", "sharegpt"]:
    """Guess a record set's format from one record's keys."""
    if isinstance(record, Mapping):
        if "messages" in record:
            return "messages"
        if "conversations" in record:
            return "sharegpt"
        if "instruction" in record or "output" in record:
            return "alpaca"
    keys = _keys(record) if isinstance(record, Mapping) else type(record).__name__
    raise DataError(
        f"cannot tell the record format from {keys}; expected alpaca (instruction, input, output), "
        "messages (OpenAI) or conversations (ShareGPT), or set the format explicitly (fields "
        "named otherwise: map them with data_columns, e.g. {instruction: prompt, output: answer})"
    )


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlevel = 2


def _short(value: Any) -> str:
    """A repr of a user's value short enough for an error message, whatever its size or depth."""
    return _SHORT.repr(value)


def _keys(record: Mapping[Any, Any], most: int = 12) -> str:
    """The first keys of ``record``, sorted, as a bounded list (keys of any type)."""
    keys = sorted(
        (_short(k) for _, k in zip(range(most + 1), record, strict=False)),
    )
    more = len(record) - most
    return "[" + ", ".join(keys[:most]) + (f", ... {more} more" if more > 0 else "") + "]"


def _expect_str(rec: Mapping[str, Any], key: str, *, required: bool, nonempty: bool = False) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise DataError("missing; it must be a string", field=key)
        return ""
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(f"must be a string, got {type(value).__name__}", field=key)
    _check_text(value, key)
    if nonempty and not value.strip():
        raise DataError("is empty; it must be a non-empty string", field=key)
    return value


def _check_text(value: str, field: str) -> None:
    """Reject text a tokenizer cannot take: an unpaired surrogate (JSON allows ``"\\ud800"``)."""
    # a search, not value.encode(): no copy of a long text
    bad = None if value.isascii() else _SURROGATE.search(value)
    if bad is not None:
        raise DataError(
            f"holds an unpaired surrogate (U+{ord(bad.group()):04X}) at character "
            f"{bad.start()}; it is not valid Unicode text",
            field=field,
        )


def to_messages(
    record: Any,
    fmt: Literal["alpaca", "messages", "sharegpt"],
    *,
    system_prompt: str | None = None,
    input_separator: str = "\n",
) -> list[dict[str, str]]:
    """Convert one record into a validated conversation ending with an assistant turn.

    Raises:
        DataError: naming the field and what would be valid (the caller adds file and index).
    """
    if not isinstance(record, Mapping):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    msgs: list[dict[str, str]]
    if fmt == "alpaca":
        instruction = _expect_str(record, "instruction", required=False)
        inp = _expect_str(record, "input", required=False)
        output = _expect_str(record, "output", required=True, nonempty=True)
        if not (instruction or inp):
            raise DataError(
                "both 'instruction' and 'input' are empty; one must hold the prompt",
                field="instruction",
            )
        system = _expect_str(record, "system", required=False) or system_prompt
        msgs = [{"role": "system", "content": system}] if system else []
        history = record.get("history") or []
        if not isinstance(history, list):
            raise DataError("must be a list of [user, assistant] pairs", field="history")
        for k, pair in enumerate(history):
            if (
                not isinstance(pair, (list, tuple))
                or len(pair) != 2
                or not all(isinstance(x, str) for x in pair)
            ):
                raise DataError(
                    f"item {k} must be a [user, assistant] pair of strings", field="history"
                )
            _check_text(pair[0], f"history[{k}][0]")
            _check_text(pair[1], f"history[{k}][1]")
            if not pair[1].strip():
                raise DataError("assistant answer is empty", field=f"history[{k}][1]")
            msgs += [
                {"role": "user", "content": pair[0]},
                {"role": "assistant", "content": pair[1]},
            ]
        user = instruction + input_separator + inp if instruction and inp else instruction or inp
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return msgs
    key, role_key, content_key = (
        ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")
    )
    turns = record.get(key)
    if not isinstance(turns, list):
        raise DataError(f"must be a list of turns, got {type(turns).__name__}", field=key)
    if not turns:
        raise DataError(
            "is empty; a conversation needs at least a user and an assistant turn", field=key
        )
    msgs = []
    for k, turn in enumerate(turns):
        where = f"{key}[{k}]"
        if not isinstance(turn, Mapping):
            raise DataError(f"must be an object with {role_key!r} and {content_key!r}", field=where)
        raw_role = turn.get(role_key)
        role = (
            (_SHAREGPT_ROLES.get(raw_role) if isinstance(raw_role, str) else None)
            if fmt == "sharegpt"
            else raw_role
        )
        if role not in ("system", "user", "assistant"):
            valid = (
                sorted(_SHAREGPT_ROLES) if fmt == "sharegpt" else ["system", "user", "assistant"]
            )
            raise DataError(
                f"unknown {role_key} {_short(raw_role)}; valid: {', '.join(valid)}",
                field=f"{where}.{role_key}",
            )
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise DataError(
                f"must be a string, got {type(content).__name__}", field=f"{where}.{content_key}"
            )
        _check_text(content, f"{where}.{content_key}")
        if role == "system" and k != 0:
            raise DataError("a system message may only come first", field=f"{where}.{role_key}")
        if role == "assistant" and not content.strip():
            raise DataError("assistant content is empty", field=f"{where}.{content_key}")
        msgs.append({"role": role, "content": content})
    if msgs[0]["role"] == "system" and not msgs[0]["content"]:
        msgs = msgs[1:]
    if system_prompt and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    if not msgs or msgs[-1]["role"] != "assistant":
        raise DataError(
            f"the conversation ends with a {msgs[-1]['role'] if msgs else 'system'} turn; "
            "training needs it to end with "
            "an assistant turn",
            field=key,
        )
    return msgs


def parse_records(
    source: Any,
    format: RecordFormat = "auto",
    *,
    system_prompt: str | None = None,
    input_separator: str = "\n",
) -> Iterator[tuple[RawRecord, str | None, list[dict[str, str]] | DataError]]:
    """Yield ``(record, format, conversation)`` for every record, the conversation replaced by a
    [`DataError`][loraforge.DataError] naming file, line, index and field when it is invalid."""
    name = source_name(source)
    fmt = None if format == "auto" else format
    for rec in _iter_records(source):
        try:
            if fmt is None:
                fmt = detect_format(rec.value)
            msgs: list[dict[str, str]] | DataError = to_messages(
                rec.value, fmt, system_prompt=system_prompt, input_separator=input_separator
            )
        except DataError as exc:
            msgs = DataError(
                exc.reason, source=name, index=rec.index, line=rec.line, field=exc.field
            )
        yield rec, fmt, msgs


def check_records(
    source: Any,
    format: RecordFormat = "auto",
    *,
    input_separator: str = "\n",
    on_bad_record: Literal["raise", "skip"] = "raise",
) -> tuple[int, list[DataError]]:
    """Read and validate every record without a tokenizer (cheap: run it before downloading a
    model). Returns the number of records read and the problems found.

    Raises:
        DataError: the source cannot be read, or (with ``on_bad_record="raise"``) the first bad
            record, naming its file, line or index and field; also when no record is usable.
    """
    read, problems = 0, []
    for _, _, msgs in parse_records(source, format, input_separator=input_separator):
        read += 1
        if isinstance(msgs, DataError):
            if on_bad_record == "raise":
                raise msgs
            problems.append(msgs)
    if read == len(problems):
        raise DataError(
            f"no usable record ({read} read, {len(problems)} bad)", source=source_name(source)
        )
    return read, problems
