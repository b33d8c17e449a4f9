"""Concept injection into BLIP-2 through hooks: token counts, gating, norm matching, exact detach."""

from __future__ import annotations

import pytest
import torch

from myvlm.injection import ConceptBank, ConceptInjector, Route, box_mask


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


def layer0_probs(backbone, batch, injector=None, active=None):
    """The first cross-attention layer's probabilities in the forward that carries the concept tokens (the
    routing's probing pass, without them, is left out), (B, H, Q, N [+ K])."""
    seen = []
    attention = backbone.model.qformer.encoder.layer[0].crossattention.attention
    handle = attention.register_forward_hook(lambda module, args, output: seen.append(output[1].detach()))
    try:
        vision_tokens_seen_by_qformer(backbone, batch, injector, active)
    finally:
        handle.remove()
    return seen[-1]


def test_routing_scales_each_querys_reading_of_the_token_by_its_attention_on_the_concept(backbone, batch):
    states, _, _ = vision_tokens_seen_by_qformer(backbone, batch)  # (B, N, D) the Q-Former's image tokens
    strength, temperature = 1.5, 0.05
    look = states[0, 5].clone()  # the concept looks like image 0's patch token 5
    values = torch.randn(1, backbone.concept_dim, generator=torch.Generator().manual_seed(0))
    plain, routed = (ConceptBank(["a"], backbone.concept_dim, values=values, routes=routes)
                     for routes in (None, [Route(look, strength, temperature)]))
    with ConceptInjector(backbone, plain) as injector:
        unrouted = layer0_probs(backbone, batch, injector, [["a"]] * 3)
    with ConceptInjector(backbone, routed) as injector:
        rerouted = layer0_probs(backbone, batch, injector, [["a"]] * 3)
    without_token = layer0_probs(backbone, batch)  # (B, H, Q, N)

    likeness = torch.nn.functional.cosine_similarity(states, look[None, None], dim=-1)  # (B, N)
    likeness[:, 0] = -torch.inf  # the ViT's class token is nowhere
    where = torch.softmax(likeness / temperature, dim=-1)
    mass = (without_token.mean(dim=1) * where[:, None, :]).sum(-1)  # (B, Q) each query's attention on the concept
    expected = (mass / mass.amax(dim=1, keepdim=True)) ** strength
    # the token's odds against any image token, per query, are multiplied by (m_q / max m) ** strength
    odds = rerouted[..., -1] / rerouted[..., 1] / (unrouted[..., -1] / unrouted[..., 1])  # (B, H, Q)
    torch.testing.assert_close(odds, expected[:, None, :].expand_as(odds), rtol=1e-3, atol=1e-6)
    assert float(expected.min()) < 0.5  # some queries really are turned away from the token
    torch.testing.assert_close(rerouted[..., :-1].sum(-1) + rerouted[..., -1], torch.ones_like(rerouted[..., -1]))


def test_a_box_limits_where_a_routed_concept_is_looked_for(backbone, batch):
    states, _, _ = vision_tokens_seen_by_qformer(backbone, batch)  # (B, N, D)
    bank = ConceptBank(["a"], backbone.concept_dim, routes=[Route(states[0, 5].clone(), 2.0, 0.05)])
    box = (0.5, 0.5, 1.0, 1.0)  # the bottom-right quarter of the image
    inside = box_mask(states.shape[1], box, touching=True)
    assert inside is not None and 0 < int(inside.sum()) < states.shape[1] - 1
    with ConceptInjector(backbone, bank) as injector:
        with injector.activate([["a"]] * 3, boxes=[[box], [None], [box]]):
            boxed, _ = injector.route_weights(states)
        with injector.activate([["a"]] * 3):
            free, _ = injector.route_weights(states)
        with pytest.raises(ValueError, match="one entry"):
            with injector.activate([["a"]] * 3, boxes=[[box], [], [box]]):
                pass
    for b in (0, 2):  # inside the box: the same likeness, renormalised; outside: nothing
        assert float(boxed[b, 0, ~inside].sum()) == 0.0
        torch.testing.assert_close(boxed[b, 0, inside], free[b, 0, inside] / free[b, 0, inside].sum())
    torch.testing.assert_close(boxed[1], free[1])  # no box: located over the whole image


def test_box_masks_take_the_patches_centred_in_a_box_or_touching_it():
    grid = lambda mask: mask[1:].view(4, 4).int().tolist()  # noqa: E731  (a class token, then 4 x 4 patches)
    box = (0.25, 0.3, 0.6, 0.5)  # columns 1 and part of 2, part of row 1
    assert grid(box_mask(17, box)) == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert grid(box_mask(17, box, touching=True)) == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    edge = (0.5, 0.5, 1.0, 1.0)  # ends on patch edges: touching adds nothing
    assert torch.equal(box_mask(17, edge), box_mask(17, edge, touching=True))
    assert box_mask(18, edge) is None  # not a grid


def test_routing_leaves_unrouted_concepts_and_samples_alone(backbone, batch):
    values = torch.randn(2, backbone.concept_dim, generator=torch.Generator().manual_seed(1))
    look = torch.randn(backbone.concept_dim)
    plain = ConceptBank(["a", "b"], backbone.concept_dim, values=values)
    half = ConceptBank(["a", "b"], backbone.concept_dim, values=values, routes=[Route(look, 2.0), None])
    with ConceptInjector(backbone, plain) as injector:
        expected = layer0_probs(backbone, batch, injector, [["b"], [], ["b"]])
    with ConceptInjector(backbone, half) as injector:
        seen = layer0_probs(backbone, batch, injector, [["b"], [], ["b"]])
        routed = layer0_probs(backbone, batch, injector, [["a"], [], ["b"]])
    torch.testing.assert_close(seen, expected)  # only the unrouted concept is active: nothing changes
    torch.testing.assert_close(routed[1:], expected[1:])  # the samples without the routed concept are untouched
    assert not torch.allclose(routed[0], expected[0])


def test_bad_routes_are_clear_errors(backbone):
    with pytest.raises(ValueError, match="strength"):
        Route(torch.zeros(4), -1.0)
    with pytest.raises(ValueError, match="look has shape"):
        ConceptBank(["a"], backbone.concept_dim, routes=[Route(torch.zeros(3), 1.0)])
    with pytest.raises(ValueError, match="routes for"):
        ConceptBank(["a"], backbone.concept_dim, routes=[None, None])


def test_routing_without_readable_cross_attention_is_a_clear_error(backbone, batch):
    routed = ConceptBank(["a"], backbone.concept_dim, routes=[Route(torch.randn(backbone.concept_dim), 1.0)])
    config = backbone.model.qformer.config
    eager, config._attn_implementation = config._attn_implementation, "sdpa"  # probabilities are not returned
    try:
        with ConceptInjector(backbone, routed) as injector, pytest.raises(RuntimeError, match="eager attention"):
            vision_tokens_seen_by_qformer(backbone, batch, injector, [["a"]] * 3)
    finally:
        config._attn_implementation = eager
