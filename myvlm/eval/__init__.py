"""Evaluation harness: the MyVLM paper's metrics and protocol, baselines, ablations, an HTML report.

    myvlm eval data_root --backbone Salesforce/blip2-opt-2.7b --out runs/eval --report runs/eval/report.html

    from myvlm.eval import evaluate, load_eval_data, MyVLMMethod, ReplaceBaseline, LoraBaseline
    summary = evaluate(backbone, load_eval_data("data_root"), [MyVLMMethod(), ReplaceBaseline(), LoraBaseline()],
                       out_dir="runs/eval")

Records (``records.jsonl``, one line per image and method) are the source of truth; tables
(``summary.json``) and the report are computed from them, and an interrupted run resumes.
"""

from myvlm.eval.baselines import LoraBaseline, ReplaceBaseline
from myvlm.eval.dataset import EvalDataset, load_eval_data
from myvlm.eval.methods import HeadSpec, Method, MyVLMMethod
from myvlm.eval.metrics import (
    Rate,
    context_correct,
    false_positive_rate,
    head_rate,
    load_sentence_embedder,
    recall,
    text_similarity,
    vqa_correct,
)
from myvlm.eval.protocol import ProtocolConfig, Scorers, ablation_methods, evaluate
from myvlm.eval.records import read_records
from myvlm.eval.report import write_report
from myvlm.eval.summary import format_tables, summarize

__all__ = [
    "EvalDataset", "HeadSpec", "LoraBaseline", "Method", "MyVLMMethod", "ProtocolConfig", "Rate", "ReplaceBaseline",
    "Scorers", "ablation_methods", "context_correct", "evaluate", "false_positive_rate", "format_tables",
    "head_rate", "load_eval_data", "load_sentence_embedder", "read_records", "recall", "summarize",
    "text_similarity", "vqa_correct", "write_report",
]
