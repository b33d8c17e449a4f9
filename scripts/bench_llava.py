"""Benchmark one LLaVA concept personalization: steps/s, sequence length, peak memory.

    python scripts/bench_llava.py --smoke                          # tiny random LLaVA on the CPU, seconds
    python scripts/bench_llava.py --variant llava_next --steps 100   # tiny LLaVA-NeXT, a whole concept
    python scripts/bench_llava.py --real-dims --device cuda          # LLaVA-1.5-7B sizes, random bf16 weights

``--real-dims`` builds LLaVA-1.5-7B from a hand-written config (CLIP ViT-L/14-336 + Llama-2-7B /
Vicuna-7B widths, the published numbers), random weights, nothing downloaded; the tokenizer is the
tiny locally trained one (vocab_size 32064 in the config), so only the timing is meaningful. Each
row times ``train_concepts`` (augmentation, processor, forward, backward, AdamW) after warm-up
steps: once with the LLaVA captioning regularizer (lambda 0.0075, its default ``from_concept`` form)
and once without it (lambda 0). ``--breakdown`` adds the time of each part of a step.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from myvlm.backbones.base import Backbone  # noqa: E402
from myvlm.backbones.llava import LlavaBackbone  # noqa: E402
from myvlm.config import AugmentConfig, BackboneConfig, TrainConfig  # noqa: E402
from myvlm.data import make_examples  # noqa: E402
from myvlm.injection import ConceptBank  # noqa: E402
from myvlm.training import train_concepts  # noqa: E402

logger = logging.getLogger("bench_llava")

CAPTIONS = [
    "sks is lying on the grass next to a red ball in a sunny garden",
    "sks is sitting on a wooden floor in front of a blue sofa",
    "sks is standing on the beach with the sea behind it",
    "sks is sleeping on a white blanket on the bed",
]


@dataclass
class Row:
    label: str  # what was timed
    seq_len: int  # tokens the LLM sees per sample (image tokens + prompt + answer + concept slot), longest
    s_per_step: float  # wall seconds per training step
    peak_gib: float  # peak memory: CUDA allocated, or the process's max RSS on the CPU

    def cells(self, batch: int) -> list[str]:
        return [self.label, str(batch), str(self.seq_len), f"{1 / self.s_per_step:.2f}", f"{self.s_per_step:.3f}",
                f"{100 * self.s_per_step:.1f}", f"{self.peak_gib:.2f}"]


def real_dims_backbone(device: torch.device, dtype: torch.dtype, layers: int | None, injection: str) -> Backbone:
    """LLaVA-1.5-7B's architecture with random weights, built on ``device`` without any download."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from myvlm.tiny import build_tiny_tokenizer, tiny_llava_processor

    tokenizer = build_tiny_tokenizer()
    processor = tiny_llava_processor("llava", tokenizer, image_size=336, patch_size=14)
    vision = CLIPVisionConfig(  # openai/clip-vit-large-patch14-336
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers or 24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    text = LlamaConfig(  # lmsys/vicuna-7b-v1.5 = Llama-2-7B, with LLaVA's 32064-token vocabulary
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers or 32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_seq_length=576,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    started = time.perf_counter()
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    logger.info("built %.2fB random parameters on %s in %.1f s", sum(p.numel() for p in model.parameters()) / 1e9,
                device, time.perf_counter() - started)
    config = BackboneConfig("random-llava-1.5-7b-dims", type="llava", device=str(device),
                            dtype=str(dtype).split(".")[-1], injection=injection)
    return LlavaBackbone(model, processor, config)


def tiny_backbone(variant: str, device: torch.device, dtype: torch.dtype, folder: Path, injection: str) -> Backbone:
    from myvlm import load_backbone
    from myvlm.tiny import build_tiny_llava

    path = build_tiny_llava(folder / variant, variant=variant)
    return load_backbone(BackboneConfig(str(path), device=str(device), dtype=str(dtype).split(".")[-1],
                                        injection=injection))


def photos(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(count)]


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def time_training(backbone: Backbone, args: argparse.Namespace, reg_lambda: float, label: str) -> Row:
    count = max(args.batch_size, 4)
    examples = make_examples(photos(count), [[CAPTIONS[i % len(CAPTIONS)]] for i in range(count)],
                             name="dog", identifier="sks")
    for example in examples:
        example.prompt = backbone.caption_prompt(["sks"])
    lengths = []
    spy = backbone.language_model.register_forward_pre_hook(
        lambda m, a, kw: lengths.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    device = backbone.device

    def run(steps: int) -> float:
        config = TrainConfig(steps=steps, batch_size=args.batch_size, reg_lambda=reg_lambda, checkpoint_every=0,
                             augment=AugmentConfig(enabled=not args.no_augment))
        bank = ConceptBank(["dog"], backbone.concept_dim)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        train_concepts(backbone, bank, examples, config, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    try:
        run(args.warmup)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = run(args.steps)
    finally:
        spy.remove()
    return Row(label, max(lengths), seconds / args.steps, peak_gib(device))


def time_parts(backbone: Backbone, args: argparse.Namespace, repeats: int = 10) -> dict[str, float]:
    """Milliseconds per step of each part of a training step, to see where the time goes."""
    from myvlm.data import Augmenter
    from myvlm.injection import ConceptInjector

    images, device = photos(args.batch_size), backbone.device
    augment, prompts = Augmenter(AugmentConfig()), [backbone.caption_prompt(["sks"])] * args.batch_size
    targets = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch_size)]
    bank = ConceptBank(["dog"], backbone.concept_dim).to(device)

    def clock(work) -> float:
        work()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return 1000 * (time.perf_counter() - started) / repeats

    batch = backbone.prepare_batch(images, targets, prompts)
    parts = {"augment + prepare_batch": clock(lambda: backbone.prepare_batch([augment(i) for i in images],
                                                                               targets, prompts))}
    def plain() -> None:  # transformers alone: labels to the model, a projector bias as the thing that learns
        backbone.model(**batch).loss.backward()

    bias = backbone.projector.linear_2.bias
    bias.requires_grad_(True)
    try:
        parts["plain transformers forward + backward (no myvlm)"] = clock(plain)
    finally:
        bias.requires_grad_(False)
        bias.grad = None
    with ConceptInjector(backbone, bank) as injector:
        def step(penalty: bool) -> None:
            with injector.activate([["dog"]] * args.batch_size):
                loss = backbone.sequence_loss(batch) + (injector.attention_penalty() if penalty else 0)
            loss.mean().backward()

        parts["forward + backward, lambda 0 (sdpa)"] = clock(lambda: step(False))
        for form in backbone.attention_forms:
            with backbone.penalize_attention(form):
                parts[f"forward + backward, regularizer {form}"] = clock(lambda: step(True))
    return parts


def print_table(rows: list[Row], args: argparse.Namespace, device_name: str) -> None:
    memory = "peak CUDA memory (GiB)" if "CPU" not in device_name else "max RSS (GiB)"
    header = ["run", "batch", "seq len", "steps/s", "s/step", "s per 100-step concept", memory]
    lines = [header] + [row.cells(args.batch_size) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"\n{device_name}; {args.steps} timed steps after {args.warmup} warm-up steps")
    for i, line in enumerate(lines):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-dims", action="store_true", help="LLaVA-1.5-7B sizes with random weights")
    parser.add_argument("--variant", choices=["llava", "llava_next"], default="llava", help="tiny model family")
    parser.add_argument("--layers", type=int, default=None, help="override layer counts (--real-dims on a CPU)")
    parser.add_argument("--injection", choices=["projector_input", "projector_output"], default="projector_input")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (tiny models: 1 is fastest)")
    parser.add_argument("--no-augment", action="store_true", help="time without photo augmentation")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 3 timed steps, 1 warm-up")
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of one step")
    args = parser.parse_args(argv)
    if args.smoke:
        args.real_dims, args.steps, args.warmup = False, 3, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("myvlm").setLevel(logging.WARNING)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads or (device.type == "cpu" and not args.real_dims):
        torch.set_num_threads(args.threads or 1)
    with tempfile.TemporaryDirectory() as folder:
        if args.real_dims:
            backbone = real_dims_backbone(device, dtype, args.layers, args.injection)
            name = f"LLaVA-1.5-7B dims{f' ({args.layers} layers)' if args.layers else ''}, random weights"
        else:
            backbone = tiny_backbone(args.variant, device, dtype, Path(folder), args.injection)
            name = f"tiny {args.variant}"
        rows = [time_training(backbone, args, 0.0075, f"{name}, lambda 0.0075"),
                time_training(backbone, args, 0.0, f"{name}, lambda 0")]
        parts = time_parts(backbone, args) if args.breakdown else {}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print_table(rows, args, f"{gpu}, {str(dtype).split('.')[-1]}, injection {args.injection}")
    for part, ms in parts.items():
        print(f"  {part}: {ms:.1f} ms per step")


if __name__ == "__main__":
    main()
