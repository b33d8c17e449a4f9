"""Per-image records: the source of truth of an evaluation, appended one JSON line at a time.

    store = RecordStore("runs/eval")        # reads runs/eval/records.jsonl if it is there
    store.check_meta(meta)                  # refuses to resume with other settings
    if not store.has(key): store.add({"key": key, ...})   # written and flushed at once

A killed run leaves at most one partial last line; it is dropped on the next open, and the
run resumes by skipping every key already present. Tables are computed from these records
only (``myvlm.eval.summary``), so every number can be traced back to the lines it counts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, Union

logger = logging.getLogger(__name__)

RECORDS_FILE, META_FILE, SUMMARY_FILE = "records.jsonl", "meta.json", "summary.json"
FORMAT, FORMAT_VERSION = "myvlm.eval", 1


def record_key(method: str, concept: str, split: int, *rest: Any) -> str:
    """``method|concept|split|...``: run records end in ``run``, image records in ``role|image|task[|qN]``."""
    return "|".join(str(part) for part in (method, concept, split, *rest))


def read_records(path: Union[str, Path]) -> list[dict[str, Any]]:
    """The complete records of a records.jsonl (a partial last line is skipped with a warning)."""
    path = Path(path)
    records = []
    lines = path.read_text().splitlines() if path.is_file() else []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise ValueError(f"{path}:{number} is not a JSON record; the file is damaged") from None
            logger.warning("%s: dropping a partial last line (an interrupted run)", path)
    return records


class RecordStore:
    """Records of one output folder, by key; ``add`` appends and flushes immediately."""

    def __init__(self, out_dir: Union[str, Path]):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / RECORDS_FILE
        self._records: dict[str, dict[str, Any]] = {}
        for record in read_records(self.path):
            self._records[record["key"]] = record
        self._repair()
        self._file = self.path.open("a")

    def _repair(self) -> None:
        """Rewrite the file when it ends in a partial line, so the next append starts on a fresh line."""
        if self.path.is_file() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self._records.values()))

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(list(self._records.values()))

    def has(self, key: str) -> bool:
        return key in self._records

    def get(self, key: str) -> dict[str, Any]:
        return self._records[key]

    def add(self, record: dict[str, Any]) -> None:
        if record["key"] in self._records:
            raise ValueError(f"record {record['key']!r} already exists")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._records[record["key"]] = record

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RecordStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- settings ------------------------------------------------------------------------------
    def check_meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Write meta.json, or check it against the existing one: same data, backbone, protocol, scorers;
        a method already there must have the same settings; new methods are added."""
        path = self.out_dir / META_FILE
        old = json.loads(path.read_text()) if path.is_file() else None
        if old is not None:
            for key in ("data_root", "backbone", "protocol", "scorers"):
                if _plain(old.get(key)) != _plain(meta.get(key)):
                    raise ValueError(
                        f"{self.out_dir} holds an evaluation with another {key} ({old.get(key)!r}, now "
                        f"{meta.get(key)!r}); use a new output folder, or delete {self.out_dir} to start over"
                    )
            for name, described in meta["methods"].items():
                if name in old["methods"] and _plain(old["methods"][name]) != _plain(described):
                    raise ValueError(
                        f"method {name!r} in {self.out_dir} was run with other settings ({old['methods'][name]}, now "
                        f"{described}); use a new output folder or another method name"
                    )
            meta = {**old, "methods": {**old["methods"], **meta["methods"]}}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
        path.write_text(json.dumps(meta, indent=2) + "\n")
        return meta


def _plain(value: Any) -> Any:
    """JSON round trip: tuples and lists compare equal, as they will after a reload."""
    return json.loads(json.dumps(value))


def read_meta(out_dir: Union[str, Path]) -> dict[str, Any]:
    path = Path(out_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} has no {META_FILE}; it is not a myvlm eval output folder")
    return json.loads(path.read_text())
