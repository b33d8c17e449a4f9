"""Evaluation harness: the MyVLM paper's metrics and protocol, baselines, ablations, an HTML report.

    myvlm eval data_root --backbone Salesforce/blip2-opt-2.7b --out runs/eval --report runs/eval/report.html

    from myvlm.eval import evaluate, load_eval_data, MyVLMMethod, ReplaceBaseline, LoraBaseline
    summary = evaluate(backbone, load_eval_data("data_root"), [MyVLMMethod(), ReplaceBaseline(), LoraBaseline()],
                       out_dir="runs/eval")

Records (``records.jsonl``, one line per image and method) are the source of truth; tables
(``summary.json``) and the report are computed from them, and an interrupted run resumes.

The names below are imported on first use, so building the CLI parser stays fast.
"""

from __future__ import annotations

from myvlm import lazy_getattr

_EXPORTS = {
    "LoraBaseline": "myvlm.eval.baselines",
    "ReplaceBaseline": "myvlm.eval.baselines",
    "EvalDataset": "myvlm.eval.dataset",
    "load_eval_data": "myvlm.eval.dataset",
    "HeadSpec": "myvlm.eval.methods",
    "Method": "myvlm.eval.methods",
    "MyVLMMethod": "myvlm.eval.methods",
    "Rate": "myvlm.eval.metrics",
    "context_correct": "myvlm.eval.metrics",
    "false_positive_rate": "myvlm.eval.metrics",
    "head_rate": "myvlm.eval.metrics",
    "load_sentence_embedder": "myvlm.eval.metrics",
    "recall": "myvlm.eval.metrics",
    "text_similarity": "myvlm.eval.metrics",
    "vqa_correct": "myvlm.eval.metrics",
    "ProtocolConfig": "myvlm.eval.protocol",
    "Scorers": "myvlm.eval.protocol",
    "ablation_methods": "myvlm.eval.protocol",
    "evaluate": "myvlm.eval.protocol",
    "read_records": "myvlm.eval.records",
    "write_report": "myvlm.eval.report",
    "format_tables": "myvlm.eval.summary",
    "summarize": "myvlm.eval.summary",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
