"""A static, self-contained HTML page of an evaluation: tables, then every image with every output.

    write_report("runs/eval", "runs/eval/report.html")      # reads records.jsonl + meta.json

Each image appears beside the frozen model's caption (and answers) and each method's output,
with the identifier highlighted, whether it counts as a hit or a false positive, and every
head's score against its threshold. Thumbnails are embedded once (as CSS classes) however often
an image appears, so the page needs no other file. Each record's cell carries its key
(``data-key``), which is how the tests check that every record is shown.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from myvlm.data import identifier_pattern
from myvlm.eval.records import RECORDS_FILE, read_meta, read_records
from myvlm.eval.summary import format_value, summarize, used_columns
from myvlm.images import ImageError, load_image

logger = logging.getLogger(__name__)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 24px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; font-size: 13px; }
table.metrics td { text-align: right; } table.metrics td:first-child { text-align: left; }
.thumb { width: 96px; height: 96px; background-size: contain; background-repeat: no-repeat;
         background-position: center; background-color: #eee; display: inline-block; }
.small { width: 48px; height: 48px; }
mark { background: #ffe58a; } .hit { color: #137333; } .miss { color: #a50e0e; } .muted { color: #777; }
.heads { font-size: 11px; color: #555; } .qa { margin-top: 4px; border-top: 1px dashed #ccc; }
table.records { table-layout: fixed; width: 100%; }
table.records td { overflow-wrap: anywhere; } table.records th:nth-child(1) { width: 112px; }
table.records th:nth-child(2) { width: 72px; }
"""


def thumbnail_css(images: dict[str, int], data_root: Path, size: int) -> str:
    """One CSS class per image holding its JPEG thumbnail (base64)."""
    rules = []
    for key, index in images.items():
        try:
            image = load_image(data_root / key)
        except ImageError as error:
            logger.warning("report: %s", error)
            continue
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
        encoded = base64.b64encode(buffer.getvalue()).decode()
        rules.append(f".img-{index} {{ background-image: url(data:image/jpeg;base64,{encoded}); }}")
    return "\n".join(rules)


def thumb(images: dict[str, int], key: str, small: bool = False) -> str:
    index = images.setdefault(key, len(images))
    extra = " small" if small else ""
    return (f'<div class="thumb{extra} img-{index}" role="img" data-image="{html.escape(key)}" '
            f'title="{html.escape(key)}"></div>')


def highlight(text: str, identifier: str) -> str:
    escaped = html.escape(text or "")
    return identifier_pattern(html.escape(identifier)).sub(lambda m: f"<mark>{m.group(0)}</mark>", escaped)


def verdict(record: dict[str, Any]) -> str:
    if record["task"] == "vqa":
        correct = record.get("vqa_correct")
        return "" if correct is None else ('<span class="hit">correct</span>' if correct else
                                           '<span class="miss">wrong</span>')
    named = record["mentions_identifier"]
    if record["role"] == "positive":
        return '<span class="hit">named</span>' if named else '<span class="miss">missed</span>'
    return '<span class="miss">false positive</span>' if named else '<span class="hit">not named</span>'


def heads_html(record: dict[str, Any]) -> str:
    parts = []
    for name, d in record.get("heads", {}).items():
        state = "fired" if d["fired"] else "silent"
        parts.append(f"{html.escape(name)}: {d['score']:.3f} vs {d['threshold']:.3g} {state}")
    return f'<div class="heads">{"; ".join(parts)}</div>' if parts else ""


def record_cell(record: dict[str, Any]) -> str:
    ident = record["identifier"]
    body = f"{highlight(record['output'], ident)} {verdict(record)}{heads_html(record)}"
    if record["task"] == "vqa":
        body = (f'<b>Q:</b> {highlight(record["question"], ident)}<br><b>A:</b> {body}'
                f'<div class="muted">accepted: {html.escape(", ".join(record["answers"]))}</div>')
    extra = ""
    if record.get("text_similarity") is not None:
        extra += f' <span class="muted">sim {record["text_similarity"]:.3f}</span>'
    if record.get("clip_score") is not None:
        extra += f' <span class="muted">CLIP-S {record["clip_score"]:.3f}</span>'
    return f'<div class="rec" data-key="{html.escape(record["key"])}">{body}{extra}</div>'


def metrics_table(rows: dict[str, dict[str, Any]], columns: Sequence[Any]) -> str:
    head = "".join(f"<th>{html.escape(c.title)}</th>" for c in columns)
    lines = [f'<table class="metrics"><tr><th>method</th>{head}</tr>']
    for method, row in rows.items():
        cells = []
        for column in columns:
            entry = row[column.name]
            title = (f"{entry['hits']}/{entry['n']} records" if "hits" in entry else
                     f"{entry.get('n', entry.get('concepts', 0))} {'records' if 'n' in entry else 'concepts'}")
            cells.append(f'<td title="{title}">{format_value(entry["value"], column)}</td>')
        lines.append(f"<tr><td>{html.escape(method)}</td>{''.join(cells)}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def image_rows(records: list[dict[str, Any]], methods: Sequence[str], images: dict[str, int]) -> str:
    """One row per (role, image): vanilla outputs, then each method's caption and answers."""
    rows: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for record in records:
        rows.setdefault((record["role"], record["image"]), {}).setdefault(record["method"], []).append(record)
    order = {"positive": 0, "hard_negative": 1, "negative": 2}
    header = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    out = [f'<table class="records"><tr><th>image</th><th>role</th><th>vanilla</th>{header}</tr>']
    for (role, key), by_method in sorted(rows.items(), key=lambda item: (order.get(item[0][0], 3), item[0][1])):
        seen, vanilla = set(), []
        for record in sorted((r for rs in by_method.values() for r in rs), key=lambda r: r["key"]):
            label = record.get("vanilla_question", "caption")
            if label not in seen:
                seen.add(label)
                prefix = f"<b>Q:</b> {html.escape(label)}<br>" if record["task"] == "vqa" else ""
                vanilla.append(f"<div>{prefix}{html.escape(record.get('vanilla') or '')}</div>")
        cells = []
        for method in methods:
            recs = sorted(by_method.get(method, []), key=lambda r: (r["task"] != "caption", r["key"]))
            cells.append(f'<td>{"".join(record_cell(r) for r in recs)}</td>')
        out.append(f"<tr><td>{thumb(images, key)}<br><small>{html.escape(key)}</small></td>"
                   f"<td>{role.replace('_', ' ')}</td><td>{''.join(vanilla)}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    return "\n".join(out)


def render_report(records: list[dict[str, Any]], meta: dict[str, Any], data_root: Path,
                  methods: Optional[Sequence[str]] = None, thumb_size: int = 128) -> str:
    """The page as a string (see write_report)."""
    summary = summarize(records, methods)
    methods = summary["methods"]
    columns = used_columns(summary)
    images: dict[str, int] = {}
    runs = {(r["method"], r["concept"], r["split"]): r for r in records if r["type"] == "run"}
    body = [f"<h1>myvlm evaluation</h1><p class=muted>data {html.escape(str(data_root))} · backbone "
            f"{html.escape(str(meta.get('backbone', {}).get('name_or_path')))} · protocol "
            f"{html.escape(json.dumps(meta.get('protocol', {})))}</p>", "<h2>Overall (mean over concepts)</h2>",
            metrics_table({m: summary["overall"][m] for m in methods}, columns)]
    for concept, table in summary["per_concept"].items():
        body.append(f'<h2 id="concept-{html.escape(concept)}">{html.escape(concept)}</h2>')
        body.append(metrics_table({m: table[m] for m in methods if m in table}, columns))
        for split in sorted({r["split"] for r in records if r["concept"] == concept}):
            trained = {m: runs[(m, concept, split)] for m in methods if (m, concept, split) in runs}
            train_keys = list(dict.fromkeys(k for run in trained.values() for k in run["train_images"]))
            strip = " ".join(thumb(images, k, small=True) for k in train_keys)
            body.append(f"<h3>{html.escape(concept)} · split {split} · trained on {strip}</h3>")
            chosen = [r for r in records if r["type"] == "image" and r["concept"] == concept and r["split"] == split]
            body.append(image_rows(chosen, [m for m in methods if any(r["method"] == m for r in chosen)], images))
    css = STYLE + thumbnail_css(images, data_root, thumb_size)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>myvlm evaluation</title>"
            f"<style>{css}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(
    out_dir: Union[str, Path], html_path: Union[str, Path], data_root: Union[str, Path, None] = None,
    methods: Optional[Sequence[str]] = None, thumb_size: int = 128,
) -> Path:
    """Write the HTML report of an eval output folder; images are read from ``data_root`` (default: meta.json's)."""
    meta = read_meta(out_dir)
    records = read_records(Path(out_dir) / RECORDS_FILE)
    if methods is not None:
        records = [r for r in records if r["method"] in methods]
    root = Path(data_root or meta["data_root"])
    page = render_report(records, meta, root, methods, thumb_size)
    html_path = Path(html_path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(page)
    logger.info("wrote the report (%d records, %.1f MB) to %s", len(records), len(page) / 2**20, html_path)
    return html_path
