"""Where training data comes from: a local file, a folder saved by ``datasets``, a Hugging Face
dataset id or a ModelScope dataset id, with the fields renamed when the source names them otherwise.

* ``train.jsonl`` or ``train.json`` (``data_source: auto`` or ``local``): loraforge's reader,
  a JSONL file one line at a time;
* a folder written by ``Dataset.save_to_disk`` (``auto`` or ``local``):
  ``datasets.load_from_disk``, and of a ``DatasetDict`` the split ``data_split``;
* ``owner/name`` with ``data_source: huggingface``:
  ``datasets.load_dataset(id, split=data_split, revision=data_revision)``;
* ``owner/name`` with ``modelscope``, or ``auto`` when no such local path exists: ModelScope's
  ``dataset_snapshot_download(id, revision=data_revision)``, then ``datasets``' loaders on the
  downloaded files (``data_split``);
* a folder of data files (``train.jsonl``, ``*.parquet``...): ``datasets.load_dataset(folder)``.

[`data_kind`][loraforge.data.sources.data_kind] decides which one a string means (an existing
path is always local; under ``auto`` another string of the form ``owner/name`` is a ModelScope
id, as for models). [`open_data`][loraforge.data.sources.open_data] returns what the dataset
builder reads, named for errors and the data report; ``data_columns`` renames fields record by
record (``{"instruction": "question", "output": "answer"}``: loraforge's name, then the source's).
[`source_fingerprint`][loraforge.data.sources.source_fingerprint] is what a resumed run compares.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from loraforge.data.records import Renamed
from loraforge.errors import DataError

__all__ = [
    "COLUMN_FIELDS",
    "DataKind",
    "data_kind",
    "is_hub_id",
    "open_data",
    "source_fingerprint",
]

DataKind = Literal["file", "folder", "huggingface", "modelscope"]

#: The record fields ``data_columns`` may rename (alpaca's, ``messages``, ShareGPT's).
COLUMN_FIELDS = ("instruction", "input", "output", "system", "history", "messages", "conversations")

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_FILE_SUFFIXES = (".json", ".jsonl")


def is_hub_id(value: str) -> bool:
    """Whether ``value`` has the form of a hub dataset id (``owner/name``, not a ``.json`` or
    ``.jsonl`` file name, not starting with ``.``, ``/`` or ``~``)."""
    return bool(_HUB_ID.fullmatch(value)) and not value.lower().endswith(_FILE_SUFFIXES)


def data_kind(spec: str, source: str = "auto") -> DataKind:
    """What ``spec`` (a recipe's ``data``/``eval_data``) names under ``data_source``: a path
    that exists is local whatever ``data_source`` says (as ``datasets.load_dataset`` reads it),
    so a local ``eval_data`` file can sit beside a hub ``data`` id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder"
    if path.exists():
        return "file"
    if source in ("huggingface", "modelscope"):
        return source  # type: ignore[return-value]
    if source == "local" or not is_hub_id(spec):
        return "file"
    return "modelscope"


def _split_of(spec: str, loaded: Any, split: str) -> Any:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"has no split {split!r}; its splits: {', '.join(loaded)} (set data_split / "
                "eval_split)",
                source=spec,
            )
        return loaded[split]
    return loaded


_SAVED = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


def _load_folder(folder: str, split: str, name: str) -> Any:
    """A folder written by ``save_to_disk``, else a folder of data files (``train.jsonl``,
    ``*.parquet``...) read by ``datasets``' generic loaders."""
    import datasets

    if any((Path(folder) / f).is_file() for f in _SAVED):
        return _split_of(name, datasets.load_from_disk(folder), split)
    try:
        return datasets.load_dataset(folder, split=split)
    except ValueError as exc:  # no data files, an unknown split...
        raise DataError(
            f"holds neither a dataset saved by datasets' save_to_disk nor data files of split "
            f"{split!r} that datasets can read ({str(exc)[:200]})",
            source=name,
        ) from None


def _load(spec: str, kind: DataKind, split: str, revision: str | None, cache: str | None) -> Any:
    """The ``datasets.Dataset`` a folder or hub id holds (a file is read by loraforge)."""
    if kind == "folder":
        return _load_folder(str(Path(spec).expanduser()), split, spec)
    where = "Hugging Face" if kind == "huggingface" else "ModelScope"
    try:
        if kind == "huggingface":
            import datasets

            return datasets.load_dataset(spec, split=split, revision=revision, cache_dir=cache)
        # ModelScope's own download of the dataset repository, then datasets' loaders on its
        # files (MsDataset needs modelscope[datasets], which pins an older datasets)
        from modelscope.hub.snapshot_download import dataset_snapshot_download

        folder = dataset_snapshot_download(spec, revision=revision or None, cache_dir=cache)
        return _load_folder(folder, split, f"modelscope:{spec}")
    except DataError:
        raise
    except Exception as exc:  # the hubs raise many kinds: network, missing id, missing split
        other = "huggingface" if kind == "modelscope" else "modelscope"
        raise DataError(
            f"could not load the {where} dataset {spec!r} (split {split!r}"
            + (f", revision {revision!r}" if revision else "")
            + f"): {type(exc).__name__}: {str(exc)[:300]}. Offline? Download it first, or save it "
            f"with datasets' save_to_disk and give that folder; a {other} id needs data_source: "
            f"{other}; a local path that does not exist is read as a hub id when it looks like "
            "owner/name",
            source=spec,
        ) from None


def _columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    return dict(columns or {})


def open_data(recipe: Any, key: str = "data") -> Any:
    """What the dataset builder reads for ``recipe.<key>`` (``"data"`` or ``"eval_data"``): the
    file's path, or the loaded ``datasets.Dataset``; wrapped to rename ``data_columns`` and to
    name the source (``huggingface:owner/name[train]``) in errors and the data report.

    Raises:
        DataError: a folder not saved by ``datasets``, a missing split, or a hub id that does not
            load (offline, unknown id, ...), naming it.
    """
    spec = getattr(recipe, key)
    kind = data_kind(spec, recipe.data_source)
    split = recipe.data_split if key == "data" else recipe.eval_split
    columns = _columns(recipe.data_columns)
    if kind == "file":
        return Renamed(spec, columns) if columns else spec
    ds = _load(spec, kind, split, recipe.data_revision, recipe.cache_dir)
    name = spec if kind == "folder" else f"{kind}:{spec}"
    return Renamed(ds, columns, name=f"{name}[{split}]" if kind != "folder" else name)


def _hash_folder(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + b"\0")
            with open(p, "rb") as f:
                while chunk := f.read(4 * 2**20):
                    h.update(chunk)
    return h.hexdigest()


def source_fingerprint(recipe: Any, key: str = "data") -> dict[str, Any]:
    """What a checkpoint records of ``recipe.<key>``'s source, compared on resume by its
    ``sha256``: for a folder the hash of its files; for a hub id the id, split, revision asked
    for, the number of records and the hash of their content as loaded (so a dataset that moved
    on under the same id is seen)."""
    spec = getattr(recipe, key)
    kind = data_kind(spec, recipe.data_source)
    if kind == "folder":
        return {"kind": kind, "path": spec, "sha256": _hash_folder(Path(spec).expanduser())}
    split = recipe.data_split if key == "data" else recipe.eval_split
    ds = _load(spec, kind, split, recipe.data_revision, recipe.cache_dir)
    h = hashlib.sha256()
    n = 0
    for record in ds:
        h.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
        n += 1
    return {
        "kind": kind,
        "path": spec,
        "split": split,
        "revision": recipe.data_revision,
        "records": n,
        "sha256": h.hexdigest(),
    }
