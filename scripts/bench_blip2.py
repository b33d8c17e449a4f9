"""Benchmark one BLIP-2 personalization: steps/s, peak memory and where the time goes.

    python scripts/bench_blip2.py                        # tiny random BLIP-2 on the CPU
    python scripts/bench_blip2.py --real-dims --device cuda --steps 30   # BLIP-2 OPT-2.7B sizes, random bf16
    python scripts/bench_blip2.py --route 1.0            # with query routing (one more Q-Former pass per forward)

It runs the library's own ``personalize`` training loop (``myvlm.training.train_concepts``)
and times it from outside: forward hooks on the vision encoder, the Q-Former and the
language model, a wrapper around batch preparation, and the rest of each step (backward,
clipping, optimizer) as the remainder. ``--real-dims`` builds BLIP-2 OPT-2.7B from its
published config with random weights (no download; weights do not change the cost).
Then it captions the training images with the concept active and reports that time too.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from myvlm.backbones.blip2 import Blip2Backbone  # noqa: E402
from myvlm.config import BackboneConfig, TrainConfig  # noqa: E402
from myvlm.data import make_examples  # noqa: E402
from myvlm.injection import ConceptBank, ConceptInjector, Route  # noqa: E402
from myvlm.training import train_concepts  # noqa: E402

logger = logging.getLogger("bench_blip2")


def real_dims_backbone(device: str, dtype: torch.dtype) -> Blip2Backbone:
    """BLIP-2 OPT-2.7B shapes (EVA ViT-g 39x1408, Q-Former 12x768, OPT 32x2560), random weights."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor,
                              OPTConfig)

    from myvlm.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    processor = Blip2Processor(BlipImageProcessor(size={"height": 224, "width": 224}), tokenizer, num_query_tokens=32)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    config = Blip2Config(
        vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                           image_size=224, patch_size=14),
        qformer_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            encoder_hidden_size=1408, cross_attention_frequency=2),
        text_config=OPTConfig(vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                              num_attention_heads=32, word_embed_proj_dim=2560, **ids).to_dict(),
        num_query_tokens=32, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    config.qformer_config._attn_implementation = "eager"
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config).to(dtype)
    cfg = BackboneConfig(name_or_path="random-blip2-opt-2.7b-dims", device=device, dtype=str(dtype).split(".")[1])
    return Blip2Backbone(model, processor, cfg)


def tiny_backbone(device: str, dtype: torch.dtype, workdir: Path) -> Blip2Backbone:
    from myvlm.tiny import build_tiny_blip2

    folder = build_tiny_blip2(workdir / "tiny-blip2")
    return Blip2Backbone.load(BackboneConfig(str(folder), device=device, dtype=str(dtype).split(".")[1]))


class Stopwatch:
    """Accumulates wall time of module forwards (via hooks) and of wrapped calls."""

    def __init__(self, device: torch.device):
        self.device, self.totals, self._starts = device, defaultdict(float), {}
        self._depth: dict[str, int] = defaultdict(int)  # a module called inside itself (routing's probing pass)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def watch(self, name: str, module: torch.nn.Module) -> None:
        def start(*_):
            self._depth[name] += 1
            if self._depth[name] == 1:
                self._sync()
                self._starts[name] = time.perf_counter()

        def stop(*_):
            self._depth[name] -= 1
            if self._depth[name] == 0:
                self._sync()
                self.totals[name] += time.perf_counter() - self._starts.pop(name)

        module.register_forward_pre_hook(start)
        module.register_forward_hook(stop)

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            self._sync()
            begin = time.perf_counter()
            out = function(*args, **kwargs)
            self._sync()
            self.totals[name] += time.perf_counter() - begin
            return out

        return timed


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-dims", action="store_true", help="BLIP-2 OPT-2.7B sizes, random weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for tiny models)")
    parser.add_argument("--route", type=float, default=0.0, help="query routing strength (0: off, the paper's)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/myvlm-bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    started = time.perf_counter()
    backbone = real_dims_backbone(args.device, dtype) if args.real_dims else tiny_backbone(args.device, dtype,
                                                                                           args.workdir)
    load_seconds = time.perf_counter() - started
    size = backbone.processor.image_processor.size["height"]
    rng = np.random.RandomState(0)
    photos = [Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(4)]
    examples = make_examples(photos, [["sks is lying on the beach"]] * 4, name="bench", identifier="sks")

    watch = Stopwatch(device)
    for name, module in [("vision encoder", backbone.model.vision_model), ("Q-Former", backbone.model.qformer),
                         ("language model", backbone.model.language_model)]:
        watch.watch(name, module)
    backbone.prepare_batch = watch.wrap("batch preparation", backbone.prepare_batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    look = torch.randn(backbone.concept_dim, generator=torch.Generator().manual_seed(0))  # any look costs the same
    bank = ConceptBank(["bench"], backbone.concept_dim, routes=[Route(look, args.route)] if args.route else None)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, checkpoint_every=0)
    result = train_concepts(backbone, bank, examples, config, progress=False)
    train_seconds = result.seconds
    split = dict(watch.totals)  # snapshot before captioning adds its own forwards
    seq_len = backbone.prepare_batch(photos[:1], ["sks is lying on the beach"])["input_ids"].shape[1]

    started = time.perf_counter()
    with ConceptInjector(backbone, bank) as injector, injector.activate([["bench"]] * len(photos)):
        backbone.generate(photos, max_new_tokens=20)
    caption_seconds = time.perf_counter() - started

    # batch preparation runs on the prefetch thread, overlapped with the steps: not part of the remainder
    preparation = split.pop("batch preparation", 0.0)
    accounted = sum(split.get(k, 0.0) for k in ("vision encoder", "Q-Former", "language model"))
    split["backward + optimizer"] = max(train_seconds - accounted, 0.0)
    rows = [
        ("device", f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})"),
        ("model", "BLIP-2 OPT-2.7B dims, random" if args.real_dims else "tiny random BLIP-2"),
        ("dtype / batch / steps", f"{str(dtype).split('.')[1]} / {args.batch_size} / {args.steps}"),
        ("query routing", f"strength {args.route}" if args.route else "off"),
        ("sequence length (tokens)", str(seq_len)),
        ("load / build (s)", f"{load_seconds:.2f}"),
        ("training (s)", f"{train_seconds:.2f}"),
        ("steps/s", f"{args.steps / train_seconds:.2f}"),
        ("s/step", f"{train_seconds / args.steps:.4f}"),
        ("s per 100-step concept", f"{100 * train_seconds / args.steps:.1f}"),
        ("caption 4 images, 20 tokens (s)", f"{caption_seconds:.2f}"),
        ("peak memory (MiB)", f"{peak_memory_mb(device):.0f}"),
        ("loss first -> last", f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"| {k:<{width}} | {v} |" for k, v in rows))
    print("\ntime split of training (forward passes timed by hooks; the rest of each step is the remainder):")
    for name, seconds in sorted(split.items(), key=lambda kv: -kv[1]):
        print(f"| {name:<22} | {seconds:8.2f} s | {100 * seconds / train_seconds:5.1f} % |")
    print(f"| {'batch preparation':<22} | {preparation:8.2f} s | (prefetch thread, overlapped with the steps) |")


if __name__ == "__main__":
    main()
