"""Concept folders: exact round-trips, clear errors on the wrong backbone, libraries, atomic saves."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from myvlm import Concept, ConceptError, MyVLM, load_concept, load_library
from myvlm.heads import AlwaysOnHead
from myvlm.injection import Route


def make_concept(backbone, name="my_dog", seed=0) -> Concept:
    torch.manual_seed(seed)
    return Concept(name=name, identifier="sks", kind="object", embedding=torch.randn(backbone.concept_dim),
                   backbone=backbone.describe(), head=AlwaysOnHead(threshold=0.3), class_word="dog",
                   training={"steps": 100})


def test_save_load_round_trip_is_exact(backbone, tmp_path):
    concept = make_concept(backbone)
    folder = concept.save(tmp_path / "my_dog")
    assert sorted(p.name for p in folder.iterdir()) == ["concept.json", "embedding.safetensors"]
    meta = json.loads((folder / "concept.json").read_text())
    assert meta["format"] == "myvlm.concept" and meta["myvlm_version"]
    assert meta["backbone"]["type"] == "blip2" and meta["backbone"]["injection"] == "qformer_input"
    assert meta["dim"] == backbone.concept_dim and meta["head"] == {"type": "always", "threshold": 0.3}
    loaded = load_concept(folder)
    assert torch.equal(loaded.embedding, concept.embedding)
    assert loaded.metadata() == concept.metadata()
    assert set(load_file(folder / "embedding.safetensors")) == {"embedding"}


def test_refuses_to_overwrite_and_replaces_atomically(backbone, tmp_path):
    first, second = make_concept(backbone, seed=0), make_concept(backbone, seed=1)
    first.save(tmp_path / "c")
    with pytest.raises(FileExistsError, match="overwrite"):
        second.save(tmp_path / "c")
    assert torch.equal(load_concept(tmp_path / "c").embedding, first.embedding)
    second.save(tmp_path / "c", overwrite=True)
    assert torch.equal(load_concept(tmp_path / "c").embedding, second.embedding)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no staging or backup folders left


def test_failed_save_leaves_nothing_behind(backbone, tmp_path, monkeypatch):
    concept = make_concept(backbone)
    monkeypatch.setattr(AlwaysOnHead, "config", lambda self: {"bad": object()})  # not JSON-able
    with pytest.raises(TypeError):
        concept.save(tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_wrong_backbone_or_width_is_a_clear_error(backbone, tmp_path):
    concept = make_concept(backbone)
    other = dict(concept.backbone, concept_dim=concept.dim * 2)
    wide = Concept(name="wide", identifier="sks", kind="object", embedding=torch.zeros(concept.dim * 2),
                   backbone=other)
    with pytest.raises(ConceptError, match="width"):
        MyVLM(backbone, [wide])
    llava = Concept(name="ll", identifier="sks", kind="object", embedding=concept.embedding,
                    backbone=dict(concept.backbone, type="llava", injection="projector_input"))
    with pytest.raises(ConceptError, match="Retrain"):
        MyVLM(backbone, [llava])
    renamed = Concept(name="r", identifier="sks", kind="object", embedding=concept.embedding,
                      backbone=dict(concept.backbone, name_or_path="Salesforce/blip2-flan-t5-xl"))
    with pytest.raises(ConceptError, match="blip2-flan-t5-xl"):
        MyVLM(backbone, [renamed])
    MyVLM(backbone, [renamed], strict_backbone=False)  # same weights under another name: allowed on request


def test_corrupt_files_are_clear_errors(backbone, tmp_path):
    folder = make_concept(backbone).save(tmp_path / "c")
    (folder / "embedding.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConceptError, match="cannot read"):
        load_concept(folder)
    (folder / "concept.json").write_text("{")
    with pytest.raises(ConceptError, match="not valid JSON"):
        load_concept(folder)
    with pytest.raises(ConceptError, match="not a concept folder"):
        load_concept(tmp_path)


def test_library_loads_every_concept_and_skips_corrupt_ones(backbone, tmp_path, caplog):
    make_concept(backbone, "a").save(tmp_path / "a")
    make_concept(backbone, "b").save(tmp_path / "b")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "concept.json").write_text("[]")
    library = load_library(tmp_path)
    assert [c.name for c in library] == ["a", "b"]
    assert "skipping" in caplog.text and "broken" in caplog.text


@pytest.mark.parametrize("name", ["my dog", "a/b", "", "../x", "-x"])
def test_bad_concept_names_are_refused(backbone, name):
    with pytest.raises(ConceptError, match="concept name"):
        Concept(name=name, identifier="sks", kind="object", embedding=torch.zeros(4), backbone={})


def test_a_routed_concept_keeps_its_route_and_is_refused_by_older_readers(backbone, tmp_path):
    look = torch.randn(backbone.concept_dim)
    concept = dataclasses.replace(make_concept(backbone), route=Route(look, 1.5, 0.03))
    folder = concept.save(tmp_path / "my_dog")
    meta = json.loads((folder / "concept.json").read_text())
    assert meta["route"] == {"strength": 1.5, "temperature": 0.03}
    assert meta["format_version"] == 2  # myvlm before routing reads version 1 only, and would drop the route
    loaded = load_concept(folder)
    assert torch.equal(loaded.route.look, look) and loaded.metadata() == concept.metadata()
    assert json.loads(make_concept(backbone).save(tmp_path / "plain").joinpath("concept.json").read_text())[
        "format_version"] == 1
    with pytest.raises(ConceptError, match="look has shape"):
        dataclasses.replace(concept, route=Route(torch.zeros(3), 1.0))
