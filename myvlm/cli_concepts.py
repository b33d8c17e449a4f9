"""``myvlm concepts list|show|remove``: what a concept library holds, read from each concept.json.

    myvlm concepts list                      # NAME  IDENTIFIER  KIND  BACKBONE  HEAD  STEPS  CREATED
    myvlm concepts show my_dog --json
    myvlm concepts remove my_dog --yes       # without --yes: says what would be deleted, deletes nothing

Listing reads only the JSON files (no model, no head is built); a folder whose concept.json is
missing, unreadable or not a myvlm concept is reported with a warning and skipped.
``remove`` only ever deletes folders that hold a myvlm concept.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from myvlm.config import CONCEPT_FILE, CONCEPT_FORMAT, EMBEDDING_FILE

logger = logging.getLogger(__name__)


class LibraryError(ValueError):
    """A concept folder or library the user named cannot be read."""


def read_metadata(folder: Path) -> dict[str, Any]:
    """The concept.json of ``folder``, checked to be a complete myvlm concept."""
    path = folder / CONCEPT_FILE
    if not path.is_file():
        raise LibraryError(f"{folder} is not a concept folder (no {CONCEPT_FILE})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LibraryError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != CONCEPT_FORMAT:
        raise LibraryError(f"{path} is not a myvlm concept")
    if not (folder / EMBEDDING_FILE).is_file():
        raise LibraryError(f"{folder} has no {EMBEDDING_FILE}")
    return meta


def library_metadata(library: Path) -> list[tuple[Path, dict[str, Any]]]:
    if not library.is_dir():
        raise LibraryError(f"concept library {library} does not exist (choose one with --library DIR)")
    found = []
    for folder in sorted(p for p in library.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            found.append((folder, read_metadata(folder)))
        except LibraryError as error:
            logger.warning("skipping %s", error)
    return found


def locate(entry: str, library: Path) -> Path:
    """A concept folder given as a path or as a name in ``library``."""
    for candidate in (Path(entry), library / entry):
        if (candidate / CONCEPT_FILE).is_file():
            return candidate
    raise LibraryError(f"no concept {entry!r} (neither a concept folder nor a concept in {library})")


def summary(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The one-line facts of a concept (name, identifier, kind, backbone, head, steps, date)."""
    head = meta.get("head") or {}
    training = meta.get("training") or {}
    backbone = meta.get("backbone") or {}
    return {
        "name": meta.get("name"), "identifier": meta.get("identifier"), "kind": meta.get("kind"),
        "backbone": backbone.get("name_or_path"), "head": head.get("type"), "threshold": head.get("threshold"),
        "steps": training.get("steps"), "created": meta.get("created"), "path": str(folder),
    }


def _table(rows: list[dict[str, Any]]) -> str:
    columns = ["name", "identifier", "kind", "backbone", "head", "steps", "created"]
    cells = [[c.upper() for c in columns]]
    for row in rows:
        head = f"{row['head']}@{row['threshold']:g}" if row["head"] and row["threshold"] is not None else row["head"]
        created = (row["created"] or "")[:16].replace("T", " ")
        values = {**row, "head": head or "none", "created": created}
        cells.append(["-" if values[c] is None else str(values[c]) for c in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells)


def cmd_list(args: argparse.Namespace) -> int:
    found = library_metadata(Path(args.library))
    if args.json:
        print(json.dumps([{**meta, "path": str(folder)} for folder, meta in found], indent=2))
    elif found:
        print(_table([summary(folder, meta) for folder, meta in found]))
    else:
        logger.warning("no concepts in %s", args.library)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    folder = locate(args.concept, Path(args.library))
    meta = read_metadata(folder)
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    for key, value in summary(folder, meta).items():
        print(f"{key:<11}{value}")
    extras = {k: v for k, v in meta.items() if k not in ("name", "identifier", "kind", "created", "format")}
    files = ", ".join(f"{p.name} ({p.stat().st_size:,} B)" for p in sorted(folder.iterdir()) if p.is_file())
    print(f"{'files':<11}{files}")
    for key, value in extras.items():
        print(f"{key}: {json.dumps(value, indent=2)}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    library = Path(args.library)
    folders = [locate(entry, library) for entry in args.names]  # all must exist before anything is deleted
    for folder in folders:
        read_metadata(folder)
    if not args.yes:
        from myvlm.cli_config import ConfigError

        print("would remove: " + ", ".join(str(f) for f in folders), flush=True)
        raise ConfigError("nothing was deleted: pass --yes to remove them")
    for folder in folders:
        doomed = folder.with_name(f".{folder.name}.removing-{os.getpid()}")
        os.replace(folder, doomed)  # the concept vanishes at once; the files go next
        shutil.rmtree(doomed)
        print(f"removed {folder}")
    return 0


def run_concepts(args: argparse.Namespace) -> int:
    return {"list": cmd_list, "show": cmd_show, "remove": cmd_remove}[args.action](args)
