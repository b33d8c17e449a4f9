"""The training loop of concept embeddings: only the concept vectors learn, the VLM is frozen.

    bank = ConceptBank(["my_dog"], dim=backbone.concept_dim)
    result = train_concepts(backbone, bank, examples, TrainConfig(), output_dir="runs/my_dog")

Each step samples a batch of photos, augments them, samples one target per photo (a caption, or
one of its question-answer pairs when it has some), activates each photo's own concepts, and
minimises the per-sample language-model loss plus lambda * the attention penalty (mean squared
concept attention summed over the attention layers, recorded inside
``backbone.penalize_attention``). Gradients are clipped per concept vector. Every
``checkpoint_every`` steps the vectors and optimizer moments are saved, and a run that
fails or is interrupted saves its last state before re-raising.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar, Union

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from myvlm.backbones.base import Backbone
from myvlm.config import TrainConfig
from myvlm.data import Augmenter, TrainingExample, sample_tasks
from myvlm.injection import ConceptBank, ConceptInjector

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # total loss per step
    lm_losses: list[float] = field(default_factory=list)  # language-model part per step
    reg_losses: list[float] = field(default_factory=list)  # attention penalty (before lambda) per step
    steps: int = 0  # steps completed (including resumed ones)
    seconds: float = 0.0  # wall time of this run

    def summary(self) -> dict[str, float]:
        tail = self.losses[-10:] or [float("nan")]
        return {"steps": self.steps, "seconds": round(self.seconds, 2),
                "first_loss": self.losses[0] if self.losses else float("nan"),
                "final_loss": sum(tail) / len(tail)}


def check_only_concepts_train(backbone: Backbone, bank: ConceptBank, optimizer: torch.optim.Optimizer) -> None:
    """Raise unless the bank's vectors are the only tensors that can change."""
    leaking = [name for name, p in backbone.model.named_parameters() if p.requires_grad]
    if leaking:
        raise RuntimeError(f"backbone parameters require grad ({leaking[:3]}...); the VLM must stay frozen")
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    if len(in_optimizer) != 1 or in_optimizer[0] is not bank.values:
        raise RuntimeError("the optimizer must hold exactly the concept vectors")


def clip_per_concept(grad: torch.Tensor, max_norm: float) -> None:
    """Clip each concept vector's gradient (rows of (C, D)) to ``max_norm``, in place."""
    norms = grad.norm(dim=1, keepdim=True)
    grad.mul_(torch.clamp(max_norm / (norms + 1e-6), max=1.0))


class BatchSampler:
    """Indices without replacement, reshuffled each pass: every photo is seen equally often."""

    def __init__(self, size: int, batch_size: int, rng: random.Random):
        self.size, self.batch_size, self.rng = size, batch_size, rng
        self.queue: list[int] = []

    def next(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            if not self.queue:
                self.queue = self.rng.sample(range(self.size), self.size)
            candidate = self.queue.pop()
            if candidate in batch and self.size >= self.batch_size:
                self.queue.insert(0, candidate)
                continue
            batch.append(candidate)
        return batch


class Prefetcher:
    """Runs ``produce`` ``count`` times, one call ahead, on a background thread.

    The next batch (augmentation, processor, host-to-device copy) is prepared while the current
    step runs on the accelerator. Only the producer thread draws random numbers, in order, so the
    batches are the same with and without prefetching.
    """

    def __init__(self, produce: Callable[[], T], count: int, enabled: bool = True):
        self.produce, self.remaining = produce, count
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="myvlm-prefetch") if enabled else None
        self.pending: Optional[Future[T]] = None

    def _submit(self) -> None:
        if self.pool is not None and self.remaining > 0:
            self.pending, self.remaining = self.pool.submit(self.produce), self.remaining - 1

    def next(self) -> T:
        if self.pool is None:
            return self.produce()
        if self.pending is None:
            self._submit()
        item, self.pending = self.pending.result(), None
        self._submit()
        return item

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def save_checkpoint(folder: Path, step: int, bank: ConceptBank, optimizer: torch.optim.Optimizer) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = optimizer.state.get(bank.values, {})
    tensors = {"values": bank.values.detach().cpu()}
    if bank.anchors is not None:
        tensors["anchors"] = bank.anchors.detach().cpu()
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            tensors[key] = state[key].detach().cpu()
    path = folder / f"step_{step:06d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"step": str(step), "names": ",".join(bank.names)})
    tmp.replace(path)
    return path


def load_checkpoint(path: Union[str, Path], bank: ConceptBank, optimizer: torch.optim.Optimizer) -> int:
    """Restore vectors and AdamW moments from ``path``; return the step it was saved at."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("names", "").split(",") != bank.names:
        raise ValueError(f"checkpoint {path} holds concepts {meta.get('names')!r}, not {bank.names}")
    tensors = load_file(str(path))
    if ("anchors" in tensors) != (bank.anchors is not None):
        raise ValueError(f"checkpoint {path} {'holds' if 'anchors' in tensors else 'lacks'} concept anchors, "
                         f"the bank {'lacks' if bank.anchors is None else 'holds'} them (another TrainConfig.init?)")
    step = int(meta["step"])
    with torch.no_grad():
        bank.values.copy_(tensors["values"])
        if bank.anchors is not None:
            bank.anchors.copy_(tensors["anchors"])
    if "exp_avg" in tensors:
        optimizer.state[bank.values] = {
            "step": torch.tensor(float(step)),
            "exp_avg": tensors["exp_avg"].to(bank.values.device),
            "exp_avg_sq": tensors["exp_avg_sq"].to(bank.values.device),
        }
    logger.info("resumed %s from %s (step %d)", bank.names, path, step)
    return step


def train_concepts(
    backbone: Backbone,
    bank: ConceptBank,
    examples: Sequence[TrainingExample],
    config: TrainConfig,
    output_dir: Optional[Union[str, Path]] = None,
    resume_from: Optional[Union[str, Path]] = None,
    progress: bool = True,
) -> TrainResult:
    """Optimise ``bank.values`` so that each example's captions become likely when its concepts are active."""
    if not examples:
        raise ValueError("no training examples")
    unknown = {c for ex in examples for c in ex.concepts} - set(bank.names)
    if unknown:
        raise ValueError(f"examples name concepts {sorted(unknown)} that the bank does not hold ({bank.names})")
    bank.to(backbone.device)
    optimizer = torch.optim.AdamW([bank.values], lr=config.lr, weight_decay=config.weight_decay)
    check_only_concepts_train(backbone, bank, optimizer)
    start = load_checkpoint(resume_from, bank, optimizer) if resume_from else 0
    rng = random.Random(config.seed + start)
    torch.manual_seed(config.seed + start)  # augmentation draws from torch's global generator
    sampler = BatchSampler(len(examples), config.batch_size, rng)
    augment = Augmenter(config.augment)
    checkpoints = Path(output_dir) / "checkpoints" if output_dir else None
    result, started, step = TrainResult(steps=start), time.perf_counter(), start
    penalized = backbone.penalize_attention(config.reg_form) if config.reg_lambda > 0 else contextlib.nullcontext()

    def next_batch() -> tuple[list[int], dict[str, torch.Tensor]]:  # the only consumer of rng and augmentation
        indices = sampler.next()
        images, mirrored = zip(*(augment.apply(examples[i].image) for i in indices))
        prompts, targets = sample_tasks(examples, indices, rng, mirrored)
        return indices, backbone.prepare_batch(list(images), targets, prompts)

    batches = Prefetcher(next_batch, count=config.steps - start, enabled=config.prefetch)
    try:
        with ConceptInjector(backbone, bank) as injector, penalized, batches:
            bar = tqdm(range(start, config.steps), desc=f"training {','.join(bank.names)}", disable=not progress)
            for step in bar:
                indices, batch = batches.next()
                with injector.activate([examples[i].concepts for i in indices]):
                    lm_loss = backbone.sequence_loss(batch)  # (B,)
                    reg_loss = injector.attention_penalty()  # (B,)
                loss = (lm_loss + config.reg_lambda * reg_loss).mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                clip_per_concept(bank.values.grad, config.grad_clip)
                optimizer.step()

                result.losses.append(loss.item())
                result.lm_losses.append(lm_loss.mean().item())
                result.reg_losses.append(reg_loss.mean().item())
                result.steps = step + 1
                bar.set_postfix(loss=f"{result.losses[-1]:.3f}", reg=f"{result.reg_losses[-1]:.4f}")
                if checkpoints and config.checkpoint_every and result.steps % config.checkpoint_every == 0:
                    save_checkpoint(checkpoints, result.steps, bank, optimizer)
    except BaseException:
        if checkpoints and result.steps > start:
            path = save_checkpoint(checkpoints, result.steps, bank, optimizer)
            logger.error("training stopped at step %d; its state is saved in %s (resume_from=...)", result.steps, path)
        raise
    result.seconds = time.perf_counter() - started
    logger.info("trained %s: %s", bank.names, result.summary())
    return result
