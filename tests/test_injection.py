"""Concept injection into BLIP-2 through hooks: token counts, gating, norm matching, exact detach."""

from __future__ import annotations

import pytest
import torch

from myvlm.injection import ConceptBank, ConceptInjector


def vision_tokens_seen_by_qformer(backbone, batch, injector=None, active=None):
    """Run a forward and return (encoder_hidden_states, encoder_attention_mask) the Q-Former received."""
    seen = {}

    def spy(module, args, kwargs):
        seen["states"] = kwargs["encoder_hidden_states"].detach().clone()
        seen["mask"] = kwargs["encoder_attention_mask"].detach().clone()

    handle = backbone.model.qformer.register_forward_pre_hook(spy, with_kwargs=True)  # runs after the injector's
    try:
        if injector is not None:
            with injector.activate(active):
                logits = backbone.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        else:
            logits = backbone.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    finally:
        handle.remove()
    return seen["states"], seen["mask"], logits


@pytest.fixture()
def batch(backbone, photos):
    return backbone.prepare_batch(photos[:3], ["sks on the beach", "a red dog", "a cat on the sofa"])


def test_one_token_per_active_concept(backbone, batch):
    bank = ConceptBank(["a", "b"], backbone.concept_dim)
    vanilla_states, _, _ = vision_tokens_seen_by_qformer(backbone, batch)
    n = vanilla_states.shape[1]
    with ConceptInjector(backbone, bank) as injector:
        states, mask, _ = vision_tokens_seen_by_qformer(backbone, batch, injector, [["a"], [], ["a", "b"]])
    assert states.shape == (3, n + 2, backbone.concept_dim)  # widest sample has two concepts
    assert mask[:, n:].tolist() == [[1, 0], [0, 0], [1, 1]]
    assert torch.equal(mask[:, :n], torch.ones(3, n, dtype=mask.dtype))
    assert torch.equal(states[:, :n], vanilla_states)  # image tokens untouched
    with ConceptInjector(backbone, bank) as injector:
        states, mask, _ = vision_tokens_seen_by_qformer(backbone, batch, injector, [["b"], ["b"], ["b"]])
    assert states.shape[1] == n + 1 and bool(mask.all())


def test_concept_token_is_norm_matched(backbone, batch):
    bank = ConceptBank(["a"], backbone.concept_dim, values=torch.full((1, backbone.concept_dim), 7.0))
    with ConceptInjector(backbone, bank) as injector:
        states, _, _ = vision_tokens_seen_by_qformer(backbone, batch, injector, [["a"]] * 3)
    image_tokens, concept = states[:, :-1], states[:, -1]
    expected = image_tokens.norm(dim=-1).mean(dim=1)
    torch.testing.assert_close(concept.norm(dim=-1), expected, rtol=1e-5, atol=1e-6)
    direction = torch.nn.functional.normalize(bank.values[0].detach(), dim=0)
    torch.testing.assert_close(torch.nn.functional.normalize(concept, dim=-1), direction.expand(3, -1))


def test_gating_leaves_inactive_samples_vanilla(backbone, batch):
    _, _, vanilla = vision_tokens_seen_by_qformer(backbone, batch)
    bank = ConceptBank(["a", "b"], backbone.concept_dim)
    with ConceptInjector(backbone, bank) as injector:
        _, _, mixed = vision_tokens_seen_by_qformer(backbone, batch, injector, [["a"], [], ["a", "b"]])
        _, _, none_active = vision_tokens_seen_by_qformer(backbone, batch, injector, [[], [], []])
    assert torch.equal(mixed[1], vanilla[1])  # the sample without a concept is bit-identical
    assert not torch.allclose(mixed[0], vanilla[0])  # the others really changed
    assert not torch.allclose(mixed[2], vanilla[2])
    assert torch.equal(none_active, vanilla)  # hooks attached, nothing active: exactly vanilla


def test_detach_restores_vanilla_bit_exactly(backbone, batch):
    _, _, before = vision_tokens_seen_by_qformer(backbone, batch)
    bank = ConceptBank(["a"], backbone.concept_dim)
    injector = ConceptInjector(backbone, bank).attach()
    _, _, during = vision_tokens_seen_by_qformer(backbone, batch, injector, [["a"]] * 3)
    injector.detach()
    _, _, after = vision_tokens_seen_by_qformer(backbone, batch)
    assert not torch.allclose(during, before)
    assert torch.equal(after, before)
    assert not backbone.model.qformer._forward_pre_hooks
    assert all(not layer.crossattention.attention._forward_hooks for layer in backbone.model.qformer.encoder.layer)


def test_gradients_reach_only_the_concepts(backbone, batch):
    bank = ConceptBank(["a", "b"], backbone.concept_dim)
    with ConceptInjector(backbone, bank) as injector, injector.activate([["a"], ["a"], ["a"]]):
        loss = backbone.sequence_loss(batch).mean() + injector.attention_penalty().mean()
    loss.backward()
    assert bank.values.grad is not None and bank.values.grad[0].abs().sum() > 0
    assert torch.equal(bank.values.grad[1], torch.zeros_like(bank.values.grad[1]))  # "b" was never active
    assert all(p.grad is None for p in backbone.model.parameters())
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_attention_penalty_is_mean_squared_concept_attention(backbone, batch):
    bank = ConceptBank(["a", "b"], backbone.concept_dim)
    probs_seen = []

    def spy(module, args, output):
        probs_seen.append(output[1].detach())

    layers = backbone.model.qformer.encoder.layer
    with ConceptInjector(backbone, bank) as injector:
        handles = [layer.crossattention.attention.register_forward_hook(spy) for layer in layers]
        with injector.activate([["a"], [], ["a", "b"]]):
            backbone.sequence_loss(batch)
            penalty = injector.attention_penalty()
        for handle in handles:
            handle.remove()
    assert len(probs_seen) == len(layers)
    expected = torch.zeros(3)
    for probs in probs_seen:  # (B, H, Q, N + 2)
        expected[0] += probs[0, :, :, -2].pow(2).mean()
        expected[2] += probs[2, :, :, -2:].pow(2).mean()
    torch.testing.assert_close(penalty.detach(), expected)
    assert penalty[1] == 0


def test_mismatched_width_and_bad_gating_are_clear_errors(backbone):
    with pytest.raises(ValueError, match="width"):
        ConceptInjector(backbone, ConceptBank(["a"], backbone.concept_dim + 1))
    injector = ConceptInjector(backbone, ConceptBank(["a"], backbone.concept_dim))
    with pytest.raises(RuntimeError, match="attach"):
        with injector.activate([["a"]]):
            pass
    with injector, pytest.raises(KeyError, match="unknown concept"):
        with injector.activate([["zzz"]]):
            pass
