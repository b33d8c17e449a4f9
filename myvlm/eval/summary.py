"""Tables from records, and nothing else: every cell says which records it counts.

    summary = summarize(read_records("runs/eval/records.jsonl"))
    summary["overall"]["myvlm"]["recall"]      # {"value": 0.83, "hits": 25, "n": 30, "concepts": 2}
    print(format_tables(summary))

A rate cell counts ``hits`` of ``n`` records of one method and concept (all splits pooled); a
mean cell averages ``n`` records. The overall row of a method is the mean of its concepts'
values (each concept weighs the same, as in the paper), with ``concepts`` saying how many had
a value. A cell with no records is None ("n/a"): an unavailable metric is never estimated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional, Sequence

NEGATIVE_ROLES = ("negative", "hard_negative")


@dataclass(frozen=True)
class Column:
    name: str  # key in the summary
    title: str  # table header
    kind: str  # "rate" (share of True), "mean" (of numbers), "run" (mean over run records)
    field: str  # the record field it reads
    roles: tuple[str, ...] = ("positive",)  # image records of these roles
    task: str = "caption"  # "caption" or "vqa"


COLUMNS = (
    Column("recall", "recall %", "rate", "mentions_identifier"),
    Column("fpr", "FPR %", "rate", "mentions_identifier", NEGATIVE_ROLES),
    Column("fpr_hard", "FPR hard %", "rate", "mentions_identifier", ("hard_negative",)),
    Column("head_recall", "head rec %", "rate", "head_fired"),
    Column("head_fpr", "head FPR %", "rate", "head_fired", NEGATIVE_ROLES),
    Column("head_fpr_hard", "head FPR hard %", "rate", "head_fired", ("hard_negative",)),
    Column("text_similarity", "text sim", "mean", "text_similarity"),
    Column("clip_score", "CLIPScore", "mean", "clip_score"),
    Column("context_accuracy", "context %", "rate", "context_correct"),
    Column("vqa_accuracy", "VQA %", "rate", "vqa_correct", task="vqa"),
    Column("train_seconds", "train s", "run", "train_seconds"),
    Column("saved_bytes", "saved", "run", "saved_bytes"),
)


def cell(records: Sequence[dict[str, Any]], column: Column) -> dict[str, Any]:
    """One table cell from the records of one method and concept."""
    if column.kind == "run":
        values = [r[column.field] for r in records if r.get("type") == "run" and r.get(column.field) is not None]
    else:
        values = [r.get(column.field) for r in records if r.get("type") == "image" and r["role"] in column.roles
                  and r["task"] == column.task]
        values = [v for v in values if v is not None]
    if not values:
        return {"value": None, "n": 0}
    if column.kind == "rate":
        hits = sum(bool(v) for v in values)
        return {"value": hits / len(values), "hits": hits, "n": len(values)}
    return {"value": sum(values) / len(values), "n": len(values)}


def overall_cell(cells: Iterable[dict[str, Any]]) -> dict[str, Any]:
    values = [c["value"] for c in cells if c["value"] is not None]
    if not values:
        return {"value": None, "concepts": 0}
    return {"value": sum(values) / len(values), "concepts": len(values)}


def summarize(records: Iterable[dict[str, Any]], methods: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Per-concept and overall tables of every method (in first-seen order, or ``methods``)."""
    records = list(records)
    order = list(methods) if methods is not None else list(dict.fromkeys(r["method"] for r in records))
    concepts = sorted({r["concept"] for r in records})
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        grouped.setdefault((record["method"], record["concept"]), []).append(record)
    per_concept = {
        concept: {method: {col.name: cell(grouped.get((method, concept), []), col) for col in COLUMNS}
                  for method in order if (method, concept) in grouped}
        for concept in concepts
    }
    overall = {
        method: {col.name: overall_cell(per_concept[c][method][col.name] for c in concepts if method in per_concept[c])
                 for col in COLUMNS}
        for method in order
    }
    return {"columns": [asdict(col) for col in COLUMNS], "methods": order, "per_concept": per_concept,
            "overall": overall}


def format_value(value: Optional[float], column: Column) -> str:
    if value is None:
        return "n/a"
    if column.kind == "rate":
        return f"{100 * value:.1f}"
    if column.name == "saved_bytes":
        return human_bytes(value)
    if column.name == "train_seconds":
        return f"{value:.1f}"
    return f"{value:.3f}"


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def used_columns(summary: dict[str, Any]) -> list[Column]:
    """Columns with a value somewhere (a data folder without questions shows no VQA column)."""
    cells = [row for table in summary["per_concept"].values() for row in table.values()]
    return [col for col in COLUMNS if any(row[col.name]["value"] is not None for row in cells)]


def format_table(rows: dict[str, dict[str, dict[str, Any]]], columns: Sequence[Column], title: str) -> str:
    """A plain-text table: one row per method."""
    header = ["method", *[c.title for c in columns]]
    body = [[method, *[format_value(row[c.name]["value"], c) for c in columns]] for method, row in rows.items()]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
              for line in body]
    return "\n".join(lines)


def format_tables(summary: dict[str, Any], methods: Optional[Sequence[str]] = None, per_concept: bool = True) -> str:
    """Every concept's table, then the overall one (rates in %, n/a where a metric has no records)."""
    keep = list(methods) if methods is not None else summary["methods"]
    columns = used_columns(summary)
    blocks = []
    if per_concept:
        for concept, table in summary["per_concept"].items():
            rows = {m: table[m] for m in keep if m in table}
            if rows:
                blocks.append(format_table(rows, columns, f"concept {concept}"))
    overall = {m: summary["overall"][m] for m in keep if m in summary["overall"]}
    blocks.append(format_table(overall, columns, "overall (mean over concepts)"))
    return "\n\n".join(blocks)
