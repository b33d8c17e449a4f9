"""The MyVLM evaluation protocol: K concepts x S random splits x N training photos, every method.

    from myvlm.eval import evaluate, load_eval_data, MyVLMMethod, ReplaceBaseline, LoraBaseline, ProtocolConfig
    data = load_eval_data("data_root")
    summary = evaluate(backbone, data, [MyVLMMethod(), ReplaceBaseline(), LoraBaseline()],
                       ProtocolConfig(n_train=4, splits=5), out_dir="runs/eval")

For each concept and split, each method learns from N sampled photos (MyVLM: head + concept
embedding), then captions the held-out photos of the concept (recall: the identifier appears),
every other concept's photos (false-positive rate; hard negatives share the class word) and
answers the questions of questions.json. Each output becomes one record (prompt, output,
vanilla output, targets, heads with scores, per-image metrics) appended to records.jsonl as it
is made; a rerun skips the records that exist. The tables are computed from the records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from PIL import Image
from tqdm.auto import tqdm

from myvlm.backbones.base import Backbone
from myvlm.data import contains_identifier, name_to_identifier
from myvlm.eval import metrics
from myvlm.eval.dataset import EvalDataset, EvalImage
from myvlm.eval.methods import (
    FitContext,
    HeadSpec,
    Method,
    MyVLMMethod,
    Output,
    Personalized,
    VanillaOutputs,
    class_question,
)
from myvlm.eval.records import SUMMARY_FILE, RecordStore, record_key
from myvlm.eval.summary import summarize

logger = logging.getLogger(__name__)


@dataclass
class ProtocolConfig:
    n_train: int = 4  # training photos per split (paper: 4); the rest of each concept's photos are held out
    splits: int = 5  # random splits per concept (paper: 5)
    seed: int = 0  # seeds the splits, the negative sample and every fit
    concepts: Optional[list[str]] = None  # concepts to evaluate; None = all (every folder serves as negatives)
    identifier: str = "sks"  # the word each personalized model should say
    kind: str = "object"  # "object" or "person": which default head, how the identifier is written
    max_negatives: Optional[int] = None  # negatives per concept (a seeded sample); None = all other photos
    batch_size: int = 8  # images per generate call
    questions: bool = True  # ask the questions of questions.json on the held-out photos


@dataclass
class Scorers:
    """The models behind the model-based metrics; a missing one makes its metric unavailable."""

    text: Optional[metrics.TextEmbedder] = None  # sentence embedder for text similarity
    clip: Optional[metrics.ClipScorer] = None  # image-text model for CLIPScore

    def describe(self) -> dict[str, Any]:
        def name(model: Any) -> Any:
            return None if model is None else (model.describe() if hasattr(model, "describe") else type(model).__name__)

        return {"text_similarity": name(self.text), "clip_score": name(self.clip)}


@dataclass
class Planned:
    """One record to make: an image in a role, captioned or asked one question."""

    key: str
    image: EvalImage
    role: str  # "positive", "negative", "hard_negative"
    task: str = "caption"  # or "vqa"
    question: Optional[int] = None  # index into image.questions


@dataclass
class Unit:
    """One method on one split of one concept."""

    method: Method
    concept: str
    split: int
    train: list[EvalImage]
    planned: list[Planned] = field(default_factory=list)

    @property
    def run_key(self) -> str:
        return record_key(self.method.name, self.concept, self.split, "run")


def plan_unit(data: EvalDataset, config: ProtocolConfig, method: Method, concept: str, split: int) -> Unit:
    """Which records a (method, concept, split) makes: held-out positives (captions, questions), then negatives."""
    n_train = method.n_train or config.n_train
    if n_train > config.n_train:
        raise ValueError(
            f"method {method.name!r} trains on {n_train} photos, more than the protocol's {config.n_train}")
    chosen = data.split(concept, split, n_train, config.seed, n_holdout=config.n_train)
    unit = Unit(method, concept, split, chosen.train)
    key = lambda *rest: record_key(method.name, concept, split, *rest)  # noqa: E731
    for image in chosen.test:
        unit.planned.append(Planned(key("positive", image.key, "caption"), image, "positive"))
    if config.questions:
        for image in chosen.test:
            for index in range(len(image.questions)):
                unit.planned.append(Planned(key("positive", image.key, f"vqa{index}"), image, "positive", "vqa", index))
    for image, role in data.negatives(concept, config.max_negatives, config.seed):
        unit.planned.append(Planned(key(role, image.key, "caption"), image, role))
    return unit


def unit_seed(config: ProtocolConfig, concept: str, split: int) -> int:
    """Shared by every method of a split, so ablations start from the same random state."""
    return zlib.crc32(f"{config.seed}/{concept}/{split}".encode())


class Evaluation:
    """One evaluation run: a backbone, a data folder, methods and a record store."""

    def __init__(self, backbone: Backbone, data: EvalDataset, config: ProtocolConfig, store: RecordStore,
                 head: HeadSpec, head_negatives: Optional[list[Image.Image]], scorers: Scorers, work_dir: Path):
        self.backbone, self.data, self.config, self.store = backbone, data, config, store
        self.head, self.head_negatives, self.scorers, self.work_dir = head, head_negatives, scorers, work_dir
        self.vanilla = VanillaOutputs(backbone, config.batch_size)

    def context(self, unit: Unit) -> FitContext:
        concept = self.data.concepts[unit.concept]
        captions = [image.captions for image in unit.train]
        mirrored = [image.mirrored for image in unit.train]
        return FitContext(
            backbone=self.backbone, concept=unit.concept, class_word=concept.class_word,
            identifier=self.config.identifier, kind=self.config.kind, images=self.data.images(unit.train),
            sources=[image.key for image in unit.train], captions=captions if all(captions) else None,
            mirrored_captions=mirrored if all(captions) and any(mirrored) else None,
            head=self.head, head_negatives=self.head_negatives, vanilla=self.vanilla, work_dir=self.work_dir,
            batch_size=self.config.batch_size,
        )

    def run_unit(self, unit: Unit) -> int:
        """Fit and record what is missing; returns the number of records made."""
        pending = [p for p in unit.planned if not self.store.has(p.key)]
        if not pending and self.store.has(unit.run_key):
            return 0
        torch.manual_seed(unit_seed(self.config, unit.concept, unit.split))
        context = self.context(unit)
        personalized = unit.method.fit(context)
        try:
            if not self.store.has(unit.run_key):
                self.store.add(self.run_record(unit, context, personalized))
            captions = [p for p in pending if p.task == "caption"]
            for start in range(0, len(captions), self.config.batch_size):
                self.record_captions(unit, context, personalized, captions[start : start + self.config.batch_size])
            for planned in (p for p in pending if p.task == "vqa"):
                self.record_answer(unit, context, personalized, planned)
        finally:
            personalized.close()
        return len(pending)

    def run_record(self, unit: Unit, context: FitContext, personalized: Personalized) -> dict[str, Any]:
        return {
            "type": "run", "key": unit.run_key, "method": unit.method.name, "concept": unit.concept,
            "split": unit.split, "train_images": context.sources, "train_seconds": round(personalized.train_seconds, 3),
            "saved_bytes": personalized.saved_bytes, "saved_what": personalized.saved_what,
            "training": personalized.training,
        }

    def base_record(self, unit: Unit, planned: Planned, output: Output) -> dict[str, Any]:
        detection = output.detections.get(unit.concept)
        return {
            "type": "image", "key": planned.key, "method": unit.method.name, "concept": unit.concept,
            "split": unit.split, "role": planned.role, "image": planned.image.key, "task": planned.task,
            "identifier": self.config.identifier, "class_word": self.data.concepts[unit.concept].class_word,
            "prompt": output.prompt, "output": output.text,
            "mentions_identifier": contains_identifier(output.text, self.config.identifier),
            "heads": {name: {"score": d.score, "threshold": d.threshold, "fired": d.fired}
                      for name, d in output.detections.items()},
            "head_fired": None if detection is None else detection.fired,
        }

    def targets(self, unit: Unit, planned: Planned) -> list[str]:
        """The held-out photo's own captions, naming the concept by the identifier (negatives have none)."""
        if planned.role != "positive":
            return []
        return [name_to_identifier(t, unit.concept, self.config.identifier, self.config.kind)
                for t in planned.image.captions]

    def record_captions(self, unit: Unit, context: FitContext, personalized: Personalized,
                        chunk: Sequence[Planned]) -> None:
        images = self.data.images([p.image for p in chunk])
        outputs = personalized.caption(images)
        vanilla = self.vanilla.captions(images)
        targets = [self.targets(unit, p) for p in chunk]
        texts = [o.text for o in outputs]
        similarity = (metrics.text_similarity(self.scorers.text, texts, targets, context.identifier,
                                              context.class_word) if self.scorers.text else [None] * len(chunk))
        positive = [i for i, p in enumerate(chunk) if p.role == "positive"]
        clip = [None] * len(chunk)
        if self.scorers.clip is not None and positive:
            scores = metrics.clip_scores(self.scorers.clip, [images[i] for i in positive], [texts[i] for i in positive],
                                         context.identifier, context.class_word)
            for i, score in zip(positive, scores):
                clip[i] = score
        for i, (planned, output) in enumerate(zip(chunk, outputs)):
            context_words = planned.image.context if planned.role == "positive" else []
            self.store.add({
                **self.base_record(unit, planned, output), "vanilla": vanilla[i], "targets": targets[i],
                "text_similarity": similarity[i], "clip_score": clip[i], "context": context_words,
                "context_correct": metrics.context_correct(output.text, context_words),
            })

    def record_answer(self, unit: Unit, context: FitContext, personalized: Personalized, planned: Planned) -> None:
        question = planned.image.questions[planned.question]
        asked = context.question(question.question)
        image = self.data.image(planned.image)
        output = personalized.ask([image], asked)[0]
        vanilla_question = class_question(asked, context.identifier, context.class_word)
        self.store.add({
            **self.base_record(unit, planned, output), "question": asked, "answers": list(question.answers),
            "vanilla_question": vanilla_question, "vanilla": self.vanilla.answers([image], vanilla_question)[0],
            "vqa_correct": metrics.vqa_correct(output.text, question.answers),
        })


def protocol_meta(backbone: Backbone, data: EvalDataset, methods: Sequence[Method], config: ProtocolConfig,
                  head: HeadSpec, head_negatives: Optional[list[Image.Image]], scorers: Scorers) -> dict[str, Any]:
    """What must not change between a run and its resumption (checked by RecordStore.check_meta)."""
    protocol = dataclasses.asdict(config)
    protocol.pop("batch_size")  # does not change results
    protocol["head"] = head.describe()
    protocol["head_negatives"] = None if head_negatives is None else len(head_negatives)
    return {"data_root": str(Path(data.root).resolve()), "backbone": backbone.describe(), "protocol": protocol,
            "scorers": scorers.describe(), "methods": {m.name: m.describe() for m in methods}}


def evaluate(
    backbone: Backbone,
    data: EvalDataset,
    methods: Sequence[Method],
    config: Optional[ProtocolConfig] = None,
    out_dir: Union[str, Path] = "runs/eval",
    head: Optional[HeadSpec] = None,
    head_negatives: Optional[list[Image.Image]] = None,
    scorers: Optional[Scorers] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the protocol; returns the summary that is also written to ``out_dir/summary.json``."""
    config, head, scorers = config or ProtocolConfig(), head or HeadSpec(), scorers or Scorers()
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    concepts = config.concepts or sorted(data.concepts)
    unknown = sorted(set(concepts) - set(data.concepts))
    if unknown:
        raise ValueError(f"no concept folder {unknown} in {data.root}; found {sorted(data.concepts)}")
    with RecordStore(out_dir) as store, tempfile.TemporaryDirectory(prefix="myvlm-eval-") as work:
        store.check_meta(protocol_meta(backbone, data, methods, config, head, head_negatives, scorers))
        units = [plan_unit(data, config, m, c, s) for c in concepts for s in range(config.splits) for m in methods]
        evaluation = Evaluation(backbone, data, config, store, head, head_negatives, scorers, Path(work))
        before = len(store)
        for unit in tqdm(units, desc="evaluating", disable=not progress):
            evaluation.run_unit(unit)
        logger.info("made %d records (%d were already in %s)", len(store) - before, before, store.path)
        summary = summarize(list(store))
    (Path(out_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def ablation_methods(backbone: Backbone, train: Optional[dict[str, Any]] = None, n_train: int = 4,
                     counts: Sequence[int] = (1, 2, 4)) -> list[Method]:
    """The paper's Tables 2 and 5: full MyVLM, fewer photos, no augmentation, no regularizer, injection points."""
    train = dict(train or {})
    variants: list[Method] = [MyVLMMethod("myvlm", train)]
    variants += [MyVLMMethod(f"myvlm:n_train={n}", train, n_train=n) for n in counts if n < n_train]
    augment = {**train.get("augment", {}), "enabled": False}
    variants.append(MyVLMMethod("myvlm:no_augment", {**train, "augment": augment}))
    variants.append(MyVLMMethod("myvlm:no_regularizer", {**train, "reg_lambda": 0.0}))
    for point in backbone.injection_points:
        if point != backbone.injection:
            variants.append(MyVLMMethod(f"myvlm:injection={point}", train, injection=point))
    return variants
