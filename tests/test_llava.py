"""LLaVA-1.5 / LLaVA-NeXT backbones: concept slots, gating, exact detach, gradients, training, VQA."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import random_image
from myvlm import BackboneConfig, MyVLM, load_backbone
from myvlm.concept import Concept, ConceptError
from myvlm.backbones.llava import SDPA_WITH_QUERY_KEY
from myvlm.config import AugmentConfig, TrainConfig
from myvlm.data import TrainingExample, make_examples, sample_tasks
from myvlm.injection import ConceptBank, ConceptInjector, Route
from myvlm.training import train_concepts
from myvlm.vqa import QUESTIONS, generate_vqa_data, read_vqa_file, replace_class_word

VARIANTS = ["llava", "llava_next"]
TARGETS = ["sks on the beach", "a red dog", "a cat on the sofa"]


@pytest.fixture(scope="session")
def tiny_llava_paths(tmp_path_factory) -> dict:
    from myvlm.tiny import build_tiny_llava

    return {v: build_tiny_llava(tmp_path_factory.mktemp(f"tiny-{v}"), variant=v) for v in VARIANTS}


def load(paths, variant, injection=None):
    return load_backbone(BackboneConfig(str(paths[variant]), injection=injection))


@pytest.fixture(params=VARIANTS)
def llava(request, tiny_llava_paths):
    return load(tiny_llava_paths, request.param)


@pytest.fixture()
def images():
    # different sizes, so LLaVA-NeXT cuts them into different numbers of patches
    return [random_image(0, (40, 48)), random_image(1, (80, 30)), random_image(2, (36, 36))]


def lm_inputs(backbone, batch):
    """The inputs_embeds and attention mask the language model receives in ``sequence_loss``."""
    seen = {}

    def spy(module, args, kwargs):
        seen["embeds"], seen["mask"] = kwargs["inputs_embeds"].detach().clone(), kwargs["attention_mask"]

    handle = backbone.language_model.register_forward_pre_hook(spy, with_kwargs=True)  # runs after the injector's
    try:
        losses = backbone.sequence_loss(batch)
    finally:
        handle.remove()
    return seen["embeds"], seen["mask"], losses


def test_labels_cover_only_the_answer(llava, images):
    batch = llava.prepare_batch(images, TARGETS, ["What is this?"] * 3)
    for row, target in enumerate(TARGETS):
        answer = batch["input_ids"][row][batch["labels"][row] != -100]
        assert llava.tokenizer.decode(answer) == f" {target}{llava.tokenizer.eos_token}"


def test_one_slot_per_active_concept_after_the_image(llava, images):
    batch = llava.prepare_batch(images, TARGETS)
    image_id = llava.model.config.image_token_id
    bank = ConceptBank(["a", "b"], llava.concept_dim)
    with ConceptInjector(llava, bank) as injector, injector.activate([["a"], [], ["a", "b"]]):
        slotted, slots = llava.with_concept_slots(batch)
        embeds, mask, _ = lm_inputs(llava, batch)  # the forward passes transformers' placeholder check
    lengths = batch["attention_mask"].sum(dim=1)
    assert (slotted["attention_mask"].sum(dim=1) - lengths).tolist() == [1, 0, 2]
    assert torch.equal((slotted["input_ids"] == image_id).sum(1), (batch["input_ids"] == image_id).sum(1))
    assert slots.mask.sum(dim=1).tolist() == [1, 0, 2] and torch.equal(mask, slotted["attention_mask"])
    for row, count in enumerate([1, 0, 2]):
        last_image = int((slotted["input_ids"][row] == image_id).nonzero().max())
        assert slots.mask[row].nonzero().flatten().tolist() == list(range(last_image + 1, last_image + 1 + count))
    assert (slotted["labels"][slots.mask] == -100).all()
    assert embeds.shape[:2] == slotted["input_ids"].shape


@pytest.mark.parametrize("injection", ["projector_input", "projector_output"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_concept_token_is_norm_matched_at_the_injection_point(tiny_llava_paths, variant, injection, images):
    backbone = load(tiny_llava_paths, variant, injection)
    batch = backbone.prepare_batch(images, TARGETS)
    bank = ConceptBank(["a"], backbone.concept_dim, values=torch.full((1, backbone.concept_dim), 3.0))
    seen = {}
    spy = backbone.projector.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with ConceptInjector(backbone, bank) as injector, injector.activate([["a"]] * 3):
        slotted, slots = backbone.with_concept_slots(batch)
        embeds, _, _ = lm_inputs(backbone, batch)
    spy.remove()
    base = seen["x"] if injection == "projector_input" else seen["y"]  # (patches, N, D)
    if variant == "llava_next":  # rows = every image's patches; the base view is the whole image
        vision = backbone.model.model.vision_tower(batch["pixel_values"][:, 0], output_hidden_states=True)
        base_views = vision.hidden_states[backbone.model.config.vision_feature_layer][:, 1:]
        rows = slots.image_rows
        torch.testing.assert_close(seen["x"][rows], base_views)
        assert rows.tolist() != [0, 1, 2]  # the three images have different patch counts
        base = base[rows]
    norms = base.norm(dim=-1).mean(dim=1)  # (B,)
    token = torch.nn.functional.normalize(bank.values.detach()[0], dim=0) * norms[:, None]  # (B, D)
    if injection == "projector_input":
        token = backbone.projector(token)
    torch.testing.assert_close(embeds[slots.mask], token, rtol=1e-5, atol=1e-5)


def test_gating_leaves_inactive_samples_vanilla(llava, images):
    batch = llava.prepare_batch(images, TARGETS)
    vanilla = llava.sequence_loss(batch)
    bank = ConceptBank(["a", "b"], llava.concept_dim)
    with ConceptInjector(llava, bank) as injector:
        with injector.activate([[], [], []]):
            assert torch.equal(llava.sequence_loss(batch), vanilla)  # nothing active: bit-exact
        with injector.activate([["a"], [], ["a", "b"]]):
            mixed = llava.sequence_loss(batch)
    # The sample without a concept is mathematically unchanged, but the others' slots make the batch
    # longer, so its rows go through matrix products of another shape: equal up to float rounding.
    torch.testing.assert_close(mixed[1], vanilla[1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(mixed[0], vanilla[0]) and not torch.allclose(mixed[2], vanilla[2])


def scores(backbone, images, prompts, active=None, injector=None):
    """Greedy generation's per-step logits (B, steps, V) through ``backbone.generate``."""
    captured = []
    original = backbone.model.generate

    def keep_scores(**kwargs):
        out = original(**kwargs, output_scores=True, return_dict_in_generate=True)
        captured.append(torch.stack(out.scores, dim=1))
        return out.sequences

    backbone.model.generate = keep_scores
    try:
        if injector is None:
            texts = backbone.generate(images, prompts, max_new_tokens=4)
        else:
            with injector.activate(active):
                texts = backbone.generate(images, prompts, max_new_tokens=4)
    finally:
        del backbone.model.generate
    return texts, captured[0]


def test_generation_gating_and_exact_detach(llava, images):
    prompts = ["What is this?", "What is this?", "Where is it?"]
    texts, before = scores(llava, images, prompts)
    injector = ConceptInjector(llava, ConceptBank(["a", "b"], llava.concept_dim)).attach()
    _, none_active = scores(llava, images, prompts, [[], [], []], injector)
    _, mixed = scores(llava, images, prompts, [["a", "b"], [], ["b"]], injector)
    injector.detach()
    after_texts, after = scores(llava, images, prompts)
    assert torch.equal(none_active, before) and torch.equal(after, before) and after_texts == texts
    # left padding: the inactive sample gets two more masked positions in front (see the gating test)
    torch.testing.assert_close(mixed[1], before[1], rtol=1e-6, atol=1e-6 * before[1].abs().max().item())
    assert not torch.allclose(mixed[0], before[0])
    assert llava.injector is None and not llava.projector._forward_hooks
    assert not llava.language_model._forward_pre_hooks
    assert all(not layer.self_attn._forward_hooks for layer in llava.language_model.layers)


def test_generation_without_the_cache_keeps_the_concept_tokens(llava, images):
    # without the KV cache every step runs the whole sequence again: the slots must hold the concepts each time
    prompts = ["What is this?"] * 3
    values = torch.randn(2, llava.concept_dim, generator=torch.Generator().manual_seed(0)) * 10
    with ConceptInjector(llava, ConceptBank(["a", "b"], llava.concept_dim, values=values)) as injector:
        with injector.activate([["a", "b"], [], ["b"]]):
            cached = llava.generate(images, prompts, max_new_tokens=6)
            recomputed = llava.generate(images, prompts, max_new_tokens=6, use_cache=False)
    assert recomputed == cached
    assert recomputed != llava.generate(images, prompts, max_new_tokens=6)  # the concepts do change the answers


@pytest.mark.parametrize("injection", ["projector_input", "projector_output"])
def test_gradients_reach_only_the_concepts(tiny_llava_paths, injection, images):
    backbone = load(tiny_llava_paths, "llava", injection)
    batch = backbone.prepare_batch(images, TARGETS)
    bank = ConceptBank(["a", "b"], backbone.concept_dim)
    with ConceptInjector(backbone, bank) as injector, backbone.penalize_attention():
        with injector.activate([["a"], ["a"], []]):
            loss = (backbone.sequence_loss(batch) + injector.attention_penalty()).mean()
    loss.backward()
    assert bank.values.grad[0].abs().sum() > 0
    assert torch.equal(bank.values.grad[1], torch.zeros_like(bank.values.grad[1]))  # "b" was never active
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())


@pytest.mark.parametrize("form", ["to_concept", "from_concept"])
def test_attention_penalty_reads_the_concept_attention(llava, images, form):
    batch = llava.prepare_batch(images, TARGETS)
    bank = ConceptBank(["a", "b"], llava.concept_dim)
    active = [["a"], [], ["a", "b"]]
    with ConceptInjector(llava, bank) as injector:
        with injector.activate([["a"], ["a"], ["a"]]):
            llava.sequence_loss(batch)
            assert torch.equal(injector.attention_penalty(), torch.zeros(3))  # lambda = 0: nothing recorded
        assert llava.model.config.text_config._attn_implementation == "sdpa"
        with llava.penalize_attention(form), injector.activate(active):
            used = llava.model.config.text_config._attn_implementation
            slotted, slots = llava.with_concept_slots(batch)
            llava.sequence_loss(batch)
            penalty = injector.attention_penalty()
        assert llava.model.config.text_config._attn_implementation == "sdpa"  # restored after the block
        assert used == ("eager" if form == "to_concept" else SDPA_WITH_QUERY_KEY)  # no T x T matrix for rows
        probs = []  # the reference: eager attention's full probabilities
        spies = [layer.self_attn.register_forward_hook(lambda m, a, out: probs.append(out[1]))
                 for layer in llava.language_model.layers]
        llava.model.set_attn_implementation({"text_config": "eager"})
        try:
            with injector.activate(active):
                llava.sequence_loss(batch)
        finally:
            llava.model.set_attn_implementation({"text_config": "sdpa"})
            for spy in spies:
                spy.remove()
    expected = torch.zeros(3)
    for layer_probs in probs:  # (B, H, T, T)
        for row in (0, 2):
            where = slots.mask[row].nonzero().flatten()
            real = slotted["attention_mask"][row].bool()
            if form == "to_concept":  # the real tokens after the concept attending to it
                later = real & (torch.arange(real.shape[0]) > where.max())
                expected[row] += layer_probs[row][:, later][:, :, where].pow(2).mean()
            else:  # the concept token's own attention over the real tokens
                expected[row] += layer_probs[row][:, where][:, :, real].pow(2).mean()
    assert len(probs) == len(llava.language_model.layers)
    torch.testing.assert_close(penalty.detach(), expected)
    assert penalty[1] == 0


def test_attention_forms_are_checked(llava, backbone):
    with pytest.raises(ValueError, match="from_concept"):
        with llava.penalize_attention("sideways"):
            pass
    with pytest.raises(ValueError, match="to_concept"):  # BLIP-2's Q-Former has no concept query
        with backbone.penalize_attention("from_concept"):
            pass


def test_query_routing_is_refused_without_queries(llava):
    routed = ConceptBank(["a"], llava.concept_dim, routes=[Route(torch.ones(llava.concept_dim), 1.0)])
    with pytest.raises(ValueError, match="query routing needs"):
        ConceptInjector(llava, routed)


@pytest.mark.parametrize("variant,injection", [("llava", "projector_input"), ("llava", "projector_output"),
                                               ("llava_next", "projector_input")])
def test_training_lowers_answer_loss_and_freezes_backbone(tiny_llava_paths, variant, injection, photos):
    backbone = load(tiny_llava_paths, variant, injection)
    captions = [["sks is lying on the beach"], ["sks is on the grass"], ["sks sitting on the sofa"],
                ["sks in the snow"]]
    examples = make_examples(photos, captions, name="dog", identifier="sks")
    for example in examples:
        example.prompt = backbone.caption_prompt(["sks"])
    weights = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    bank = ConceptBank(["dog"], backbone.concept_dim)
    batch = backbone.prepare_batch([e.image for e in examples], [e.captions[0] for e in examples],
                                   [e.prompt for e in examples])

    def answer_loss():
        with torch.no_grad(), ConceptInjector(backbone, bank) as injector, injector.activate([["dog"]] * 4):
            return backbone.sequence_loss(batch).mean().item()

    before = answer_loss()
    config = TrainConfig(steps=25, augment=AugmentConfig(enabled=False), **backbone.training_defaults("caption"))
    result = train_concepts(backbone, bank, examples, config, progress=False)
    assert answer_loss() < before - 0.05, (before, answer_loss())
    assert result.steps == 25 and all(r > 0 for r in result.reg_losses)  # the regularizer was active
    assert all(torch.equal(weights[k], v) for k, v in backbone.model.state_dict().items())
    assert backbone.model.config.text_config._attn_implementation == "sdpa"


def test_sample_tasks_mixes_questions_with_captions():
    import random

    plain = TrainingExample(image=None, captions=["sks here"], source="a.jpg", concepts=["dog"])
    assert sample_tasks([plain], [0], random.Random(0)) == (None, ["sks here"])  # BLIP-2 style: no prompt
    vqa = TrainingExample(image=None, captions=["sks here"], source="b.jpg", concepts=["dog"],
                          prompt="Please caption this image of sks.", questions=[("What color is sks?", "brown")])
    rng = random.Random(0)
    drawn = [sample_tasks([vqa], [0], rng) for _ in range(200)]
    tasks = {(p[0], t[0]) for p, t in drawn}
    assert tasks == {("Please caption this image of sks.", "sks here"), ("What color is sks?", "brown")}
    assert 60 < sum(p[0].startswith("What") for p, _ in drawn) < 140  # one of two tasks, uniformly


def test_ask_without_active_concepts_is_vanilla_generate(llava, images):
    concept = Concept(name="dog", identifier="sks", kind="object", embedding=torch.randn(llava.concept_dim),
                      backbone=llava.describe())
    vlm = MyVLM(llava, [concept])
    answers = vlm.ask(images, "What is sks doing?", progress=False, max_new_tokens=5)
    assert [a.text for a in answers] == llava.generate(images, ["What is sks doing?"] * 3, max_new_tokens=5)
    assert all(a.active == [] for a in answers)
    forced = vlm.ask(images[:1], "What is sks doing?", force=["dog"], progress=False, max_new_tokens=5)
    assert forced[0].active == ["dog"]


def test_caption_prompt_names_the_active_concepts(llava, images, monkeypatch):
    concepts = [Concept(name=n, identifier=i, kind=k, embedding=torch.randn(llava.concept_dim),
                        backbone=llava.describe())
                for n, i, k in [("dog", "sks", "object"), ("anna", "anna", "person")]]
    asked = []
    monkeypatch.setattr(llava, "generate", lambda imgs, prompts=None, **kw: asked.extend(prompts) or [""] * len(imgs))
    MyVLM(llava, concepts).caption(images[:1], force=["dog", "anna"], progress=False)
    MyVLM(llava, concepts).caption(images[:1], progress=False)
    assert asked == ["Please caption this image of Anna and sks.", "Please caption this image."]


def test_concepts_of_another_backbone_are_refused(llava, backbone, tiny_llava_paths):
    blip2_concept = Concept(name="dog", identifier="sks", kind="object",
                            embedding=torch.randn(backbone.concept_dim), backbone=backbone.describe())
    with pytest.raises(ConceptError, match="blip2"):
        MyVLM(llava, [blip2_concept])
    other_point = load(tiny_llava_paths, llava.backbone_type, "projector_output")
    concept = Concept(name="dog", identifier="sks", kind="object", embedding=torch.randn(llava.concept_dim),
                      backbone=llava.describe())
    assert concept.backbone["injection"] == "projector_input"
    with pytest.raises(ConceptError, match="projector_input"):
        MyVLM(other_point, [concept])


def test_vqa_data_generator_writes_an_editable_file(tiny_llava_paths, photos, tmp_path, monkeypatch):
    backbone = load(tiny_llava_paths, "llava")
    for i, photo in enumerate(photos[:2]):
        photo.save(tmp_path / f"{i}.png")
    table = generate_vqa_data(backbone, tmp_path, class_word="dog", identifier="sks", max_new_tokens=3)
    saved = json.loads((tmp_path / "vqa.json").read_text())
    assert saved == table and sorted(saved) == ["0.png", "1.png"]
    assert [p["question"] for p in saved["0.png"]] == [q.format("sks") for q in QUESTIONS["object"]]
    saved["0.png"] = [{"question": "What color is sks?", "answer": "sks is brown."}]  # a user's edit
    (tmp_path / "vqa.json").write_text(json.dumps(saved))
    photos[2].save(tmp_path / "2.png")
    answer = "The dog is lying on a dog bed."
    monkeypatch.setattr(backbone, "generate", lambda imgs, prompts, **kw: [answer] * len(imgs))
    generate_vqa_data(backbone, tmp_path, class_word="dog", identifier="sks")
    pairs = read_vqa_file(tmp_path / "vqa.json", ["0.png", "2.png"])
    assert pairs[0] == [("What color is sks?", "sks is brown.")]  # the edit survived
    assert pairs[1][0] == ("What color is sks?", "sks is lying on sks bed.")
    assert replace_class_word("The man waves at a man.", "man", "Anna") == "Anna waves at Anna."


def test_personalize_vqa_writes_pairs_and_uses_llava_defaults(tiny_llava_paths, photos, tmp_path):
    import myvlm

    backbone = load(tiny_llava_paths, "llava")
    data = tmp_path / "my_dog"
    data.mkdir()
    for i, photo in enumerate(photos):
        photo.save(data / f"{i}.png")
    (data / "captions.json").write_text(json.dumps({f"{i}.png": [f"sks on the {p}"] for i, p in
                                                    enumerate(["beach", "grass", "sofa", "snow"])}))
    concept = myvlm.personalize(data, name="my_dog", captions=[[f"sks on the {p}"] for p in
                                                               ["beach", "grass", "sofa", "snow"]],
                                class_word="dog", backbone=backbone, head="always", task="vqa",
                                train={"steps": 2, "checkpoint_every": 0}, progress=False)
    assert len(json.loads((data / "vqa.json").read_text())["0.png"]) == len(QUESTIONS["object"])
    assert concept.training["config"]["reg_lambda"] == 10.0 and concept.training["task"] == "vqa"
    assert concept.backbone["type"] == "llava" and concept.backbone["injection"] == "projector_input"


def test_personalize_vqa_keeps_pairs_next_to_listed_photos(tiny_llava_paths, photos, tmp_path):
    """Photos given as a list of files from one folder still get their vqa.json saved beside them."""
    import myvlm

    backbone = load(tiny_llava_paths, "llava")
    paths = []
    for i, photo in enumerate(photos):
        photo.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    myvlm.personalize(paths, name="my_dog", captions=[["sks here"]] * len(paths), class_word="dog",
                      backbone=backbone, head="always", task="vqa", train={"steps": 1, "checkpoint_every": 0},
                      progress=False)
    saved = json.loads((tmp_path / "vqa.json").read_text())
    assert sorted(saved) == [p.name for p in paths]
