"""Concept injection: learned concept tokens appended to a frozen VLM's visual features.

    bank = ConceptBank(["my_dog", "anna"], dim=backbone.concept_dim)
    with ConceptInjector(backbone, bank) as injector:       # hooks attached
        with injector.activate([["my_dog"], [], ["my_dog", "anna"]]):  # per-sample gating
            captions = backbone.generate(images)
    # hooks removed: the backbone is exactly vanilla again

Each active concept adds one token per sample. Its value is the concept vector
L2-normalised and rescaled to the mean norm of that sample's image tokens (paper Eq. 3).
An *anchored* concept (``ConceptBank(anchors=...)``) adds a fixed vector -- how the concept
looks to the VLM, ``myvlm.look`` -- to its learned one, each normalised, before that; its
``token_values()`` are what a saved concept keeps, so using it needs no anchor.
Samples with fewer active concepts than others get masked padding slots; when no sample
in a batch has an active concept the hooks change nothing at all. Concept state, gating
and the attention penalty are all per sample, so several concepts can train in one batch.

A *routed* concept (``ConceptBank(routes=...)``, backbones with learned queries: BLIP-2) is read mostly
by the queries that look where the concept is: the concept is located among the image tokens by its
look (``Route``), and each query's attention logit on the token gets ``strength * log(m_q / max m)``,
``m_q`` the query's attention on that place without the token. Where the concept's head says where it
found the concept (``Detection.box``: a crop-scoring probe's best crop, a face; ``activate(..., boxes=...)``), the
look is searched among the patches that overlap that box only, so that a look-alike elsewhere in the image
does not draw the token.
Not in the paper: one appended token is otherwise read by whichever query, and the name can land on another
object of the image (the toy world measures it: README, "Query routing").
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import torch
from torch import nn

if TYPE_CHECKING:
    from myvlm.backbones.base import Backbone

logger = logging.getLogger(__name__)

ConceptRef = Union[int, str]
Box = tuple[float, float, float, float]  # (left, top, right, bottom) as fractions of the image


@dataclass(frozen=True)
class Route:
    """Query routing of one concept token (see the module's docstring)."""

    look: torch.Tensor  # (D,) how the concept looks at the injection point (``myvlm.look``), to find it by
    strength: float  # beta: the token's logit for a query gets beta * log(its attention on the concept / the most)
    temperature: float = 0.02  # softmax temperature over the image tokens' cosine likeness to ``look``

    def __post_init__(self) -> None:
        if self.look.ndim != 1:
            raise ValueError(f"a route's look is one vector, got shape {tuple(self.look.shape)}")
        if self.strength < 0 or self.temperature <= 0:
            raise ValueError(f"route strength must be >= 0 and temperature > 0, got {self.strength}, "
                             f"{self.temperature}")


def grid_offset(tokens: int) -> Optional[int]:
    """How many leading non-patch tokens (a class token) precede a square grid of patch tokens: 0 or 1;
    None when ``tokens`` is no such grid."""
    for offset in (0, 1):
        if tokens - offset > 0 and math.isqrt(tokens - offset) ** 2 == tokens - offset:
            return offset
    return None


def box_mask(tokens: int, box: Box, touching: bool = False) -> Optional[torch.Tensor]:
    """(tokens,) bool: the patch tokens of a square grid whose centres lie in ``box`` (``touching``: whose patches
    overlap it at all); a leading class token (1 + g*g tokens) is left out. None when the tokens are not a grid
    (the caller then uses them all)."""
    offset = grid_offset(tokens)
    if offset is None:
        return None
    grid = math.isqrt(tokens - offset)
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    left, top, right, bottom = box
    if touching:  # the patch [centre - half, centre + half) overlaps the box by more than an edge
        half = 0.5 / grid
        cols = (centres + half > left) & (centres - half < right)
        rows = (centres + half > top) & (centres - half < bottom)
    else:
        cols = (centres >= left) & (centres < right)
        rows = (centres >= top) & (centres < bottom)
    if not bool(cols.any()):  # a box narrower than a patch: the column its centre falls in
        cols[min(int((left + right) / 2 * grid), grid - 1)] = True
    if not bool(rows.any()):
        rows[min(int((top + bottom) / 2 * grid), grid - 1)] = True
    mask = torch.zeros(tokens, dtype=torch.bool)
    mask[offset:] = (rows[:, None] & cols[None, :]).reshape(-1)
    return mask


class ConceptBank(nn.Module):
    """C concept vectors of width D: ``values`` is the only trainable tensor of a personalization.
    ``anchors`` (C, D), optional and fixed: a concept's token is then its normalised anchor plus its normalised
    vector (a zero row: no anchor for that concept). ``routes``: one ``Route`` or None per concept."""

    def __init__(self, names: Sequence[str], dim: int, values: Optional[torch.Tensor] = None, init_std: float = 1.0,
                 seed: Optional[int] = None, anchors: Optional[torch.Tensor] = None,
                 routes: Optional[Sequence[Optional[Route]]] = None):
        super().__init__()
        if len(set(names)) != len(names):
            raise ValueError(f"concept names must be unique, got {list(names)}")
        self.names = list(names)
        if values is None:  # seeded: the same seed gives the same start whatever ran before
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            values = torch.randn(len(self.names), dim, generator=generator) * init_std
        if values.shape != (len(self.names), dim):
            raise ValueError(f"concept values have shape {tuple(values.shape)}, expected ({len(self.names)}, {dim})")
        self.values = nn.Parameter(values.detach().clone().float())  # (C, D), kept in fp32
        if anchors is not None and anchors.shape != (len(self.names), dim):
            raise ValueError(f"concept anchors have shape {tuple(anchors.shape)}, expected ({len(self.names)}, {dim})")
        self.register_buffer("anchors", None if anchors is None else anchors.detach().clone().float())
        routes = list(routes) if routes is not None else []
        if routes and len(routes) != len(self.names):
            raise ValueError(f"{len(routes)} routes for {len(self.names)} concepts")
        for route in routes:
            if route is not None and route.look.shape != (dim,):
                raise ValueError(f"a route's look has shape {tuple(route.look.shape)}, expected ({dim},)")
        routed = any(r is not None for r in routes)  # buffers (C, D), (C,), (C,): strength 0 = not routed
        self.register_buffer("route_looks", torch.stack([r.look.float() if r else torch.zeros(dim) for r in routes])
                             if routed else None)
        self.register_buffer("route_strength", torch.tensor([r.strength if r else 0.0 for r in routes])
                             if routed else None)
        self.register_buffer("route_temperature", torch.tensor([r.temperature if r else 1.0 for r in routes])
                             if routed else None)

    @property
    def routed(self) -> bool:
        return self.route_strength is not None and bool((self.route_strength > 0).any())

    def token_values(self) -> torch.Tensor:
        """(C, D): the vectors the tokens are made of (normalised anchor + normalised vector where anchored)."""
        if self.anchors is None:
            return self.values
        anchored = self.anchors.norm(dim=1, keepdim=True) > 0
        combined = nn.functional.normalize(self.anchors, dim=1) + nn.functional.normalize(self.values, dim=1)
        return torch.where(anchored, combined, self.values)

    @property
    def dim(self) -> int:
        return self.values.shape[1]

    def index(self, ref: ConceptRef) -> int:
        if isinstance(ref, int):
            if not 0 <= ref < len(self.names):
                raise IndexError(f"concept index {ref} out of range for {len(self.names)} concepts")
            return ref
        try:
            return self.names.index(ref)
        except ValueError:
            raise KeyError(f"unknown concept {ref!r}; this bank holds {self.names}") from None


class ConceptInjector:
    """Owns the hooks and the per-sample gating state for one backbone and one bank."""

    def __init__(self, backbone: "Backbone", bank: ConceptBank):
        if bank.dim != backbone.concept_dim:
            raise ValueError(
                f"concept width {bank.dim} does not match {backbone.backbone_type} injection point "
                f"{backbone.injection!r} of width {backbone.concept_dim}"
            )
        if bank.routed and not backbone.supports_routing:
            raise ValueError(f"query routing needs a backbone whose learned queries read the image (BLIP-2); "
                             f"{backbone.backbone_type} has none: train the concept with route=0")
        self.backbone = backbone
        self.bank = bank
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._ids: Optional[torch.Tensor] = None  # (B, K) concept indices, padded with 0
        self._mask: Optional[torch.Tensor] = None  # (B, K) True where a slot holds an active concept
        self._boxes: Optional[list[list[Optional[Box]]]] = None  # per sample and active concept: where it is
        self._attention: list[torch.Tensor] = []  # per recorded layer: (B,) mean p^2 over active slots

    # ---- hooks -------------------------------------------------------------------------------
    def attach(self) -> "ConceptInjector":
        if not self._handles:
            self._handles = self.backbone.install_hooks(self)
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "ConceptInjector":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ---- gating ------------------------------------------------------------------------------
    @contextmanager
    def activate(self, active: Sequence[Sequence[ConceptRef]],
                 boxes: Optional[Sequence[Sequence[Optional[Box]]]] = None) -> Iterator["ConceptInjector"]:
        """Make ``active[b]`` the concepts of sample ``b`` inside the block. ``boxes[b][k]``, optional: where
        concept ``active[b][k]`` is in image ``b`` (fractions of the image the backbone sees; None: not known),
        e.g. the crop its head found it in; a routed concept is then located inside that box only."""
        if not self.attached:
            raise RuntimeError("attach the injector (use it as a context manager) before activating concepts")
        rows = [[self.bank.index(ref) for ref in sample] for sample in active]
        for row in rows:
            if len(set(row)) != len(row):
                raise ValueError(f"a concept is listed twice for one sample: {row}")
        if boxes is not None and [len(b) for b in boxes] != [len(row) for row in rows]:
            raise ValueError(f"boxes must give one entry (or None) per active concept of each sample: "
                             f"{[len(b) for b in boxes]} for {[len(row) for row in rows]}")
        self._boxes = [list(b) for b in boxes] if boxes is not None and any(x for b in boxes for x in b) else None
        width = max((len(row) for row in rows), default=0)
        self._attention = []
        if width:
            device = self.bank.values.device
            self._ids = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=device)
            self._mask = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in rows], device=device)
        try:
            yield self
        finally:
            self._ids = self._mask = self._boxes = None

    @property
    def batch_size(self) -> Optional[int]:
        return None if self._ids is None else self._ids.shape[0]

    @property
    def active_mask(self) -> Optional[torch.Tensor]:
        """(B, K) True where sample b has a k-th active concept; None when no concept is active."""
        return self._mask

    @property
    def concept_tokens_count(self) -> int:
        """K: the number of concept slots appended to every sample of the current batch."""
        return 0 if self._ids is None else self._ids.shape[1]

    def concept_tokens(self, image_tokens: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Tokens to append to ``image_tokens`` (B, N, D): ((B, K, D), mask (B, K)), or None if none is active."""
        if self._ids is None:
            return None
        if image_tokens.shape[0] != self._ids.shape[0]:
            raise ValueError(
                f"concepts were activated for {self._ids.shape[0]} samples but the batch has {image_tokens.shape[0]}"
            )
        ids, mask = self._ids.to(image_tokens.device), self._mask.to(image_tokens.device)
        values = self.bank.token_values().to(image_tokens.device)[ids]  # (B, K, D), fp32
        target_norm = image_tokens.detach().float().norm(dim=-1).mean(dim=1)  # (B,) mean norm of the image tokens
        tokens = nn.functional.normalize(values, dim=-1) * target_norm[:, None, None]
        tokens = tokens * mask[..., None]  # padded slots carry zeros (they are masked out as well)
        return tokens.to(image_tokens.dtype), mask

    def route_weights(self, image_tokens: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Where each active routed concept is among ``image_tokens`` (B, N, D): ((B, K, N) weights summing to 1
        over the patch tokens, (B, K) route strengths, 0 for unrouted slots); None when no active slot is routed."""
        if self._ids is None or not self.bank.routed:
            return None
        ids, mask = self._ids.to(image_tokens.device), self._mask.to(image_tokens.device)
        strength = self.bank.route_strength.to(image_tokens.device)[ids] * mask  # (B, K)
        if not bool((strength > 0).any()):
            return None
        looks = self.bank.route_looks.to(image_tokens.device)[ids]  # (B, K, D)
        likeness = nn.functional.normalize(looks, dim=-1) @ nn.functional.normalize(
            image_tokens.detach().float(), dim=-1).transpose(1, 2)  # (B, K, N)
        offset = grid_offset(image_tokens.shape[1]) or 0
        likeness[..., :offset] = -torch.inf  # a leading class token is nowhere
        if self._boxes is not None:  # where a head found the concept: only the tokens of patches that overlap its box
            for b, row in enumerate(self._boxes):
                for k, box in enumerate(row):
                    inside = box_mask(image_tokens.shape[1], box, touching=True) if box is not None else None
                    if inside is not None:
                        likeness[b, k, ~inside.to(likeness.device)] = -torch.inf
        temperature = self.bank.route_temperature.to(image_tokens.device)[ids]  # (B, K)
        return torch.softmax(likeness / temperature[..., None], dim=-1), strength

    # ---- attention regularizer ---------------------------------------------------------------
    def record_attention(self, concept_probs: torch.Tensor, query_mask: Optional[torch.Tensor] = None) -> None:
        """Take one layer's attention probabilities onto the concept slots, (B, H, Q, K).

        ``query_mask`` (B, Q) limits the mean to some queries per sample (None = all Q).
        """
        if self._mask is None:
            return
        mask = self._mask.to(concept_probs.device)
        squared = concept_probs.float().pow(2) * mask[:, None, None, :]
        heads, queries = concept_probs.shape[1], concept_probs.shape[2]
        if query_mask is not None:
            squared = squared * query_mask.to(squared.device, squared.dtype)[:, None, :, None]
            queries = query_mask.sum(dim=1).clamp(min=1).to(squared.dtype)  # (B,)
        per_sample = squared.sum(dim=(1, 2, 3)) / (heads * queries * mask.sum(dim=1).clamp(min=1))
        self._attention.append(per_sample)

    def attention_penalty(self) -> torch.Tensor:
        """Sum over recorded layers of mean(p^2) onto active concepts, per sample (B,)."""
        if not self._attention:
            size = self.batch_size or 0
            return torch.zeros(size, device=self.bank.values.device)
        return torch.stack(self._attention).sum(dim=0)
