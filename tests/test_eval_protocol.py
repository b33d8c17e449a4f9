"""`myvlm eval` end to end on a tiny random BLIP-2: 2 concepts x 2 splits, resumable, honest tables."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from myvlm import load_backbone
from myvlm.config import BackboneConfig
from myvlm.data import class_word_to_identifier
from myvlm.eval import (
    HeadSpec,
    LoraBaseline,
    MyVLMMethod,
    ProtocolConfig,
    ReplaceBaseline,
    Scorers,
    ablation_methods,
    evaluate,
    load_eval_data,
    read_records,
    summarize,
)
from myvlm.eval.cli import add_eval_arguments, run_eval_command
from myvlm.eval.methods import Method, Output, Personalized
from myvlm.eval.records import RECORDS_FILE, SUMMARY_FILE, RecordStore
from myvlm.heads import ConceptHead, register_head

QUICK = {"steps": 3, "batch_size": 2}
CONCEPTS = {"red_toy": ((220, 30, 30), "toy"), "blue_toy": ((30, 30, 220), "toy"), "green_cat": ((30, 200, 30), "cat")}


@register_head("eval_test_colour")
class ColourHead(ConceptHead):
    """Fires when an image's mean colour is near the positives' mean: a recogniser with a known answer."""

    higher_is_present = False  # the score is a distance

    def __init__(self, threshold: float = 60.0):
        super().__init__(threshold)
        self.mean = torch.zeros(3)

    @staticmethod
    def colour(image: Image.Image) -> torch.Tensor:
        return torch.tensor(np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(0))

    def fit(self, positives, negatives=()):
        self.mean = torch.stack([self.colour(image) for image in positives]).mean(0)

    def score(self, images):
        return torch.stack([(self.colour(image) - self.mean).norm() for image in images])

    def config(self):
        return {"type": self.head_type, "threshold": self.threshold}

    def state_dict(self):
        return {"mean": self.mean}

    @classmethod
    def from_state(cls, config, tensors, **runtime):
        head = cls(config["threshold"])
        head.mean = tensors["mean"]
        return head


def is_red(image: Image.Image) -> bool:
    r, g, b = ColourHead.colour(image).tolist()
    return r > g + 50 and r > b + 50


@dataclass
class RedSaysSks(Method):
    """A test double with known outputs: 'sks' on every red image, whatever the concept."""

    name: str = "red_says_sks"

    def fit(self, context):
        return ScriptedOutputs()


class ScriptedOutputs(Personalized):
    saved_what = "nothing"
    training: dict = {}

    def caption(self, images):
        return [Output("sks on the beach" if is_red(im) else "a toy on the beach", None) for im in images]

    def ask(self, images, question):
        return [Output("red" if is_red(im) else "blue", question) for im in images]


def write_data(root: Path, per_concept: int = 4) -> Path:
    """3 concepts of noisy solid colours (two share the class word 'toy'), with every ground-truth file."""
    for index, (name, (rgb, _)) in enumerate(CONCEPTS.items()):
        folder = root / name
        folder.mkdir(parents=True)
        rng = np.random.RandomState(index)
        for i in range(per_concept):
            pixels = np.clip(np.array(rgb) + rng.randint(-20, 20, (48, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        files = [f"{i:02d}.png" for i in range(per_concept)]
        captions = {f: [f"{name} is lying on the beach", f"a photo of {name} on the grass"] for f in files}
        (folder / "captions.json").write_text(json.dumps(captions))
        (folder / "context.json").write_text(json.dumps({f: ["beach"] for f in files}))
        colour = name.split("_")[0]
        questions = {"*": [{"question": f"What color is {name}?", "answers": [colour]}]}
        (folder / "questions.json").write_text(json.dumps(questions))
    (root / "classes.json").write_text(json.dumps({name: word for name, (_, word) in CONCEPTS.items()}))
    return root


class WordCounts:
    """Deterministic stand-in sentence embedder (the real one is tested in test_eval_metrics.py)."""

    def __call__(self, texts):
        vocabulary = ["toy", "beach", "grass", "lying", "photo", "on", "the"]
        return torch.tensor([[text.lower().split().count(word) + 1e-3 for word in vocabulary] for text in texts])


@pytest.fixture()
def data_root(tmp_path) -> Path:
    return write_data(tmp_path / "data")


def run(backbone, root, out, methods, **protocol):
    config = ProtocolConfig(**{"n_train": 2, "splits": 2, "concepts": ["blue_toy", "red_toy"], **protocol})
    return evaluate(backbone, load_eval_data(root), methods, config, out, head=HeadSpec("eval_test_colour"),
                    scorers=Scorers(text=WordCounts()), progress=False)


def methods():
    return [MyVLMMethod(train=QUICK), ReplaceBaseline(), LoraBaseline(train=QUICK, lr=1e-3), RedSaysSks()]


def recount(records, method, concept, roles, field):
    values = [r[field] for r in records if r["type"] == "image" and r["method"] == method
              and r["concept"] == concept and r["role"] in roles and r["task"] == "caption" and r[field] is not None]
    return sum(values) / len(values) if values else None


def test_eval_end_to_end_tables_equal_records(backbone, data_root, tmp_path):
    weights = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    modules = {name: type(m) for name, m in backbone.model.named_modules()}
    summary = run(backbone, data_root, tmp_path / "out", methods())
    records = read_records(tmp_path / "out" / RECORDS_FILE)

    # 4 methods x 2 concepts x 2 splits; each: 1 run + 2 held-out captions + 2 questions + 8 negatives
    assert len(records) == 16 * 13 and len({r["key"] for r in records}) == len(records)
    runs = [r for r in records if r["type"] == "run"]
    for run_record in runs:
        held_out = {r["image"] for r in records if r["type"] == "image" and r["role"] == "positive"
                    and r["method"] == run_record["method"] and r["split"] == run_record["split"]
                    and r["concept"] == run_record["concept"]}
        assert len(run_record["train_images"]) == 2 and not held_out & set(run_record["train_images"])
    assert {r["saved_bytes"] > 0 for r in runs if r["method"] in ("myvlm", "lora")} == {True}

    # the tables are the records, counted again here by hand
    for method in ("myvlm", "replace", "lora", "red_says_sks"):
        for concept in ("blue_toy", "red_toy"):
            row = summary["per_concept"][concept][method]
            assert row["recall"]["value"] == recount(records, method, concept, ["positive"], "mentions_identifier")
            assert row["fpr"]["value"] == recount(records, method, concept, ["negative", "hard_negative"],
                                                  "mentions_identifier")
            assert row["text_similarity"]["value"] == pytest.approx(
                recount(records, method, concept, ["positive"], "text_similarity"))
    assert json.loads((tmp_path / "out" / SUMMARY_FILE).read_text()) == json.loads(json.dumps(summarize(records)))

    # known answers: the scripted method names every red image; the colour head fires on its own concept only
    red, blue = summary["per_concept"]["red_toy"]["red_says_sks"], summary["per_concept"]["blue_toy"]["red_says_sks"]
    assert (red["recall"]["value"], red["fpr"]["value"], red["vqa_accuracy"]["value"]) == (1.0, 0.0, 1.0)
    assert (blue["recall"]["value"], blue["fpr"]["value"], blue["fpr_hard"]["value"]) == (0.0, 0.5, 1.0)
    assert summary["overall"]["red_says_sks"]["recall"] == {"value": 0.5, "concepts": 2}
    mine = summary["overall"]["myvlm"]
    assert (mine["head_recall"]["value"], mine["head_fpr"]["value"], mine["head_fpr_hard"]["value"]) == (1.0, 0.0, 0.0)
    assert summary["overall"]["lora"]["head_recall"]["value"] is None  # no head: n/a

    # per-image JSON: prompts, outputs, targets, heads; MyVLM equals vanilla where its head is silent
    for r in (r for r in records if r["type"] == "image"):
        assert {"prompt", "output", "vanilla", "heads", "identifier", "class_word"} <= set(r)
        if r["method"] == "myvlm":
            assert list(r["heads"]) == [r["concept"]] and r["head_fired"] == (r["role"] == "positive")
            if not r["head_fired"]:
                assert r["output"] == r["vanilla"]
        if r["method"] == "replace" and r["task"] == "caption":
            assert r["output"] == (class_word_to_identifier(r["vanilla"], r["class_word"], "sks") or r["vanilla"])
        if r["role"] == "positive" and r["task"] == "caption":
            assert r["targets"] and all("sks" in t for t in r["targets"]) and r["context"] == ["beach"]
        if r["task"] == "vqa":
            assert r["question"] == "What color is sks?" and r["vanilla_question"] == "What color is the toy?"

    # LoRA was unloaded: the frozen backbone is bit-identical, module for module
    assert all(torch.equal(weights[k], v) for k, v in backbone.model.state_dict().items())
    assert {name: type(m) for name, m in backbone.model.named_modules()} == modules
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_interrupted_eval_resumes_only_missing_records(backbone, data_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(backbone, data_root, out, methods())
    path = out / RECORDS_FILE
    lines = path.read_text().splitlines(keepends=True)
    kept, dropped = lines[: len(lines) // 2], [json.loads(line) for line in lines[len(lines) // 2 :]]
    path.write_text("".join(kept) + '{"key": "half-written')  # killed in the middle of a line

    fitted = Counter()
    for cls in (MyVLMMethod, ReplaceBaseline, LoraBaseline, RedSaysSks):
        original = cls.fit
        counted = lambda self, context, _fit=original: fitted.update([self.name]) or _fit(self, context)  # noqa: E731
        monkeypatch.setattr(cls, "fit", counted)
    run(backbone, data_root, out, methods())

    after = path.read_text().splitlines(keepends=True)
    assert after[: len(kept)] == kept  # finished records are untouched
    redone = {json.loads(line)["key"]: json.loads(line) for line in after[len(kept) :]}
    assert set(redone) == {r["key"] for r in dropped}  # exactly the missing ones, each once
    units = {(r["method"], r["concept"], r["split"]) for r in dropped}
    assert sum(fitted.values()) == len(units) < 16  # complete (method, concept, split) units are not refitted
    for old in dropped:  # the same seeds give the same outputs
        if old["type"] == "image":
            assert redone[old["key"]]["output"] == old["output"], old["key"]

    with pytest.raises(ValueError, match="another protocol"):
        run(backbone, data_root, out, methods(), n_train=1)


def test_mirrored_captions_json_goes_to_training_with_its_photo(backbone, data_root, tmp_path, monkeypatch):
    import myvlm.eval.methods

    folder = data_root / "red_toy"
    files = sorted(p.name for p in folder.glob("*.png"))
    (folder / "mirrored_captions.json").write_text(json.dumps({f: f"red_toy mirrored {f}" for f in files}))
    calls, personalize = [], myvlm.eval.methods.personalize

    def spy(images, **kwargs):
        calls.append((images, kwargs["mirrored_captions"]))
        return personalize(images, **kwargs)

    (data_root / "blue_toy" / "captions.json").unlink()  # mirror-image captions alone make no targets
    (data_root / "blue_toy" / "mirrored_captions.json").write_text("{}")
    with pytest.raises(ValueError, match="mirrored_captions.json needs a captions.json beside it"):
        load_eval_data(data_root)
    (data_root / "blue_toy" / "mirrored_captions.json").unlink()

    monkeypatch.setattr(myvlm.eval.methods, "personalize", spy)
    run(backbone, data_root, tmp_path / "out", [MyVLMMethod(train=QUICK)], concepts=["red_toy"])
    assert len(calls) == 2  # one per split
    for images, mirrored in calls:
        assert len(images) == len(mirrored) == 2
        for image, texts in zip(images, mirrored):
            (text,) = texts
            photo = Image.open(folder / text.split()[-1]).convert("RGB")
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(photo))  # its own photo's mirror


def test_record_store_drops_a_partial_last_line(tmp_path):
    (tmp_path / RECORDS_FILE).write_text('{"key": "a", "x": 1}\n{"key": "b", "x"')
    with RecordStore(tmp_path) as store:
        assert len(store) == 1 and store.has("a") and not store.has("b")
        store.add({"key": "b", "x": 2})
    assert [r["key"] for r in read_records(tmp_path / RECORDS_FILE)] == ["a", "b"]


def test_lora_baseline_trains_saves_and_restores_the_backbone(backbone, data_root, tmp_path):
    from myvlm.eval.methods import FitContext, VanillaOutputs

    data = load_eval_data(data_root)
    images = data.images(data.concepts["red_toy"].images[:2])
    vanilla = backbone.generate(images)
    weights = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    context = FitContext(backbone, "red_toy", "toy", "sks", "object", images, ["a", "b"],
                         [["red_toy is lying on the beach"]] * 2, HeadSpec("eval_test_colour"), None,
                         VanillaOutputs(backbone), tmp_path)
    personalized = LoraBaseline(train={"steps": 20, "batch_size": 2}, lr=1e-2).fit(context)
    try:
        assert personalized.training["final_loss"] < personalized.training["first_loss"] - 0.5
        adapter = tmp_path / "lora-red_toy" / "adapter_model.safetensors"
        assert personalized.saved_bytes == adapter.stat().st_size > 0
        assert (tmp_path / "lora-red_toy" / "adapter_config.json").is_file()
        assert [o.text for o in personalized.caption(images)] != vanilla  # the adapter is in use
    finally:
        personalized.close()
    assert all(torch.equal(weights[k], v) for k, v in backbone.model.state_dict().items())
    assert backbone.generate(images) == vanilla


def test_lora_baseline_trains_flipped_photos_on_their_mirrored_captions(backbone, data_root, tmp_path, monkeypatch):
    """The baseline gets what MyVLM gets from a mirrored_captions.json: every flip trains on the mirror's caption."""
    from myvlm.eval.methods import FitContext, VanillaOutputs

    data = load_eval_data(data_root)
    images = data.images(data.concepts["red_toy"].images[:2])
    seen, prepare = [], backbone.prepare_batch

    def spy(batch_images, targets, prompts=None):
        seen.extend(targets)
        return prepare(batch_images, targets, prompts)

    monkeypatch.setattr(backbone, "prepare_batch", spy)
    context = FitContext(backbone, "red_toy", "toy", "sks", "object", images, ["a", "b"],
                         [["red_toy is lying on the beach"]] * 2, HeadSpec("eval_test_colour"), None,
                         VanillaOutputs(backbone), tmp_path, mirrored_captions=[["red_toy in a mirror"]] * 2)
    flips = {"steps": 3, "batch_size": 2, "augment": {"hflip_p": 1.0}}
    LoraBaseline(train=flips).fit(context).close()
    assert seen == ["sks in a mirror"] * 6
    seen.clear()
    LoraBaseline(train={**flips, "augment": {"hflip_p": 0.0}}).fit(context).close()
    assert seen == ["sks is lying on the beach"] * 6


def test_ablations_blip2_one_table(backbone, data_root, tmp_path):
    variants = ablation_methods(backbone, QUICK, n_train=2)
    assert [m.name for m in variants] == ["myvlm", "myvlm:n_train=1", "myvlm:no_augment", "myvlm:no_regularizer"]
    run(backbone, data_root, tmp_path / "out", variants, splits=1, concepts=["red_toy"], questions=False)
    records = read_records(tmp_path / "out" / RECORDS_FILE)
    runs = {r["method"]: r for r in records if r["type"] == "run"}
    assert len(runs["myvlm:n_train=1"]["train_images"]) == 1 and len(runs["myvlm"]["train_images"]) == 2
    assert runs["myvlm:n_train=1"]["train_images"][0] == runs["myvlm"]["train_images"][0]
    assert runs["myvlm:no_augment"]["training"]["config"]["augment"]["enabled"] is False
    assert runs["myvlm:no_regularizer"]["training"]["config"]["reg_lambda"] == 0.0
    positives = {m: sorted(r["image"] for r in records if r["method"] == m and r.get("role") == "positive")
                 for m in runs}
    assert len({tuple(p) for p in positives.values()}) == 1  # every variant is tested on the same photos


def test_ablations_llava_projector_input_and_output(tmp_path_factory, data_root, tmp_path):
    from myvlm.tiny import build_tiny_llava

    folder = build_tiny_llava(tmp_path_factory.mktemp("tiny-llava-eval"))
    llava = load_backbone(BackboneConfig(str(folder), max_new_tokens=8))
    wanted = ("myvlm", "myvlm:injection=projector_output")
    variants = [m for m in ablation_methods(llava, QUICK, n_train=2) if m.name in wanted]
    assert len(variants) == 2
    run(llava, data_root, tmp_path / "out", variants + [LoraBaseline(train=QUICK)], splits=1, concepts=["red_toy"],
        questions=False, max_negatives=2)
    records = read_records(tmp_path / "out" / RECORDS_FILE)
    runs = {r["method"]: r for r in records if r["type"] == "run"}
    assert set(runs) == {"myvlm", "myvlm:injection=projector_output", "lora"}
    assert llava.injection == "projector_input"  # the variant did not change the shared backbone


def test_cli_runs_prints_tables_and_writes_report(tiny_blip2_path, data_root, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out, report = tmp_path / "out", tmp_path / "report.html"
    args = parser.parse_args([str(data_root), "--out", str(out), "--backbone", str(tiny_blip2_path), "--head",
                              "eval_test_colour", "--methods", "myvlm", "replace", "--splits", "1", "--n-train", "2",
                              "--steps", "2", "--concepts", "red_toy", "--sentence-model", "none", "--report",
                              str(report)])
    assert args.handler is run_eval_command and run_eval_command(args) == 0
    printed = capsys.readouterr().out
    assert "concept red_toy" in printed and "overall (mean over concepts)" in printed and "head rec %" in printed
    assert "text sim" not in printed  # no sentence model: the column is n/a everywhere, so it is left out
    keys = [r["key"] for r in read_records(out / RECORDS_FILE)]
    page = report.read_text()
    assert all(f'data-key="{k}"' in page for k in keys if not k.endswith("|run"))
    again = parser.parse_args([str(data_root), "--out", str(out), "--summarize-only"])
    assert run_eval_command(again) == 0 and capsys.readouterr().out.split("\n\nper-image")[0] in printed


def test_cli_builds_one_shared_clip_probe_extractor():
    from myvlm.eval.cli import _head
    from myvlm.heads.features import TINY_CLIP_CONFIG

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    spec = json.dumps({"type": "open_clip", "model_cfg": TINY_CLIP_CONFIG, "pretrained": None, "seed": 0})
    args = parser.parse_args(["root", "--out", "o", "--head", "clip_probe", "--head-extractor", spec,
                              "--head-kwargs", '{"threshold": 0.7}'])
    head = _head(args)
    first, second = head.build(), head.build()
    assert first.feature_extractor is second.feature_extractor and first.threshold == 0.7
    assert head.describe()["kwargs"]["feature_extractor"]["model_cfg"] == TINY_CLIP_CONFIG
