"""The toy world: scenes with known ground truth, personal concepts, pretrained tiny VLMs, MyVLM measured.

    from myvlm.toyworld import run_toyworld_demo, format_toyworld_report
    print(format_toyworld_report(run_toyworld_demo("/tmp/myvlm-demo")))

Modules: ``scenes`` (generator, grammar, parser), ``concepts`` (personal concepts, hard negatives,
photo pools), ``models`` (tiny BLIP-2 / open_clip / LLaVA builders, shipped checkpoints, the
``toyworld_clip`` feature extractor), ``pretrain`` (the pretraining stages), ``evaluate`` (caption /
VQA accuracy), ``bench`` (MyVLM on the world), ``demo`` (what ``myvlm demo`` runs).
Importing this package registers the ``toyworld_clip`` extractor, so concept files whose head uses it
load after ``import myvlm.toyworld``.
"""

from myvlm.toyworld.demo import format_toyworld_report, run_toyworld_demo
from myvlm.toyworld.models import toyworld_blip2, toyworld_clip_spec

__all__ = ["format_toyworld_report", "run_toyworld_demo", "toyworld_blip2", "toyworld_clip_spec"]
