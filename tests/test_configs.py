"""Every shipped YAML composes with Hydra and builds what it describes, on tiny models, offline."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from myvlm.cli_config import (
    CHECKOUT_CONFIGS,
    GROUPS,
    ConfigError,
    TaskConfig,
    compose_config,
    find_config_dir,
    group_options,
    head_spec,
    resolve,
    to_dataclass,
)
from myvlm.config import BackboneConfig, TrainConfig
from conftest import random_image

CONFIGS = CHECKOUT_CONFIGS
OPTIONS = [(group, option) for group in GROUPS for option in group_options(group, CONFIGS)]
PRIMARIES = ["train", "caption"]
TINY_EXTRACTOR = OmegaConf.load(CONFIGS / "head" / "clip_probe_tiny.yaml").feature_extractor


def compose_train(*overrides: str):
    return compose_config("train", ["concept.name=toy", *overrides], CONFIGS)


def test_every_yaml_is_covered_by_these_tests():
    shipped = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")}
    covered = {f"{name}.yaml" for name in PRIMARIES} | {f"{g}/{o}.yaml" for g, o in OPTIONS}
    assert shipped == covered
    assert {"blip2_opt_2.7b", "blip2_flan_t5_xl", "tiny", "llava_1.5_7b", "llava_next"} <= set(group_options("backbone", CONFIGS))
    assert {"auto", "clip_probe", "clip_probe_tiny", "face", "always"} <= set(group_options("head", CONFIGS))


@pytest.mark.parametrize("name", PRIMARIES)
def test_primary_configs_compose_and_resolve(name):
    cfg = compose_config(name, ["concept.name=toy"] if name == "train" else [], CONFIGS)
    values = resolve(cfg)
    if name == "train":
        assert values["run_dir"].startswith("outputs/") and values["run_dir"].endswith("-toy")
        assert values["train"]["seed"] == values["seed"] == 0
    else:
        assert values["task"]["name"] == "caption" and values["library"] == "concepts"
        to_dataclass(BackboneConfig, {k: v for k, v in values["backbone"].items() if v is not None}, "backbone")


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_every_group_option_composes_into_its_dataclass(group, option):
    overrides = [f"{group}={option}"] + (["backbone.name_or_path=/x"] if option == "tiny" else [])
    values = resolve(compose_train(*overrides))[group]
    if group == "backbone":
        config = to_dataclass(BackboneConfig, values, "backbone")
        assert set(values) == set(asdict(BackboneConfig())), "list every field so that every key=value works"
        assert config.name_or_path
    elif group == "train":
        to_dataclass(TrainConfig, {k: v for k, v in values.items() if v is not None}, "train")
    elif group == "task":
        assert to_dataclass(TaskConfig, values, "task").name == option
    else:
        for kind in ("object", "person"):
            name, _ = head_spec(values, kind)
            assert name == values.get("type") or (option == "auto" and name in ("clip_probe", "face"))


@pytest.mark.parametrize("option,fixture", [("blip2_opt_2.7b", "tiny_blip2_path"), ("blip2_flan_t5_xl", "tiny_blip2_t5_path"),
                                            ("tiny", "tiny_blip2_path")])
def test_blip2_backbone_configs_load_a_tiny_checkpoint(option, fixture, request):
    from myvlm.backbones import load_backbone

    folder = request.getfixturevalue(fixture)
    values = resolve(compose_train(f"backbone={option}", f"backbone.name_or_path={folder}", "backbone.device=cpu"))
    backbone = load_backbone(to_dataclass(BackboneConfig, values["backbone"], "backbone"))
    assert backbone.backbone_type == "blip2" and backbone.concept_dim == 32
    assert backbone.model.dtype.is_floating_point and backbone.device.type == "cpu"


@pytest.mark.parametrize("option,variant", [("llava_1.5_7b", "llava"), ("llava_next", "llava_next")])
def test_llava_backbone_configs_load_a_tiny_checkpoint(option, variant, tmp_path):
    from myvlm.backbones import available_backbones, load_backbone
    from myvlm import tiny

    if variant not in available_backbones() or not hasattr(tiny, "build_tiny_llava"):
        pytest.skip("the LLaVA backbone is not in this checkout")
    folder = tiny.build_tiny_llava(tmp_path / variant, variant=variant)
    values = resolve(compose_train(f"backbone={option}", f"backbone.name_or_path={folder}", "backbone.device=cpu"))
    backbone = load_backbone(to_dataclass(BackboneConfig, values["backbone"], "backbone"))
    assert backbone.backbone_type == variant


@pytest.mark.parametrize("option", group_options("head", CONFIGS))
def test_head_configs_build_their_heads(option):
    """Each head config builds; probes are fitted on the tiny random encoder (the real one is a download)."""
    from myvlm.heads import build_head

    values = resolve(compose_train(f"head={option}"))["head"]
    kind = "person" if option == "face" else "object"
    name, kwargs = head_spec(values, kind)
    if name == "face":
        pytest.importorskip("dlib")
    if name == "clip_probe":
        kwargs["feature_extractor"] = OmegaConf.to_container(TINY_EXTRACTOR)
        kwargs["training"] = {**kwargs.get("training", {}), "steps": 20}
    head = build_head(name, **kwargs)
    assert head.head_type == name
    if name == "clip_probe":
        head.fit([random_image(i, (64, 64)) for i in range(2)], [random_image(10 + i, (64, 64)) for i in range(4)])
        assert len(head.detect([random_image(0, (64, 64))])) == 1
    assert head.threshold == (values.get("threshold") or head.threshold)


def test_demo_head_is_the_tiny_head_config():
    from myvlm.demo import TINY_HEAD

    values = resolve(compose_train("head=clip_probe_tiny"))["head"]
    assert values["feature_extractor"] == TINY_HEAD["feature_extractor"]
    assert values["threshold"] == TINY_HEAD["threshold"]
    assert values["training"]["lr"] == TINY_HEAD["training"]["lr"]


def test_default_train_config_is_the_dataclass_default():
    values = resolve(compose_train())["train"]
    config = to_dataclass(TrainConfig, {k: v for k, v in values.items() if v is not None}, "train")
    assert asdict(config) == asdict(TrainConfig())
    assert values["reg_lambda"] is None  # the backbone's own default for the task
    quick = resolve(compose_train("train=quick"))["train"]
    assert quick["steps"] == 10 and quick["checkpoint_every"] == 0 and quick["lr"] == values["lr"]


@pytest.mark.parametrize("overrides,message", [
    (["train.stepz=5"], "unknown config key 'train.stepz'"),
    (["backbone=nope"], "no config 'nope' in group backbone/ (available: blip2_flan_t5_xl"),
    (["steps"], "unexpected argument 'steps': config overrides are key=value"),
    (["train.steps=[1"], "cannot parse override 'train.steps=[1'"),
    (["head.threshold=0.3"], "head=auto has no options"),
])
def test_bad_overrides_are_one_line_errors_naming_them(overrides, message):
    with pytest.raises(ConfigError) as error:
        compose_train(*overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_values_and_added_keys_are_caught_by_the_dataclass_schema():
    with pytest.raises(ConfigError, match=r"bad value for 'train.steps'"):
        to_dataclass(TrainConfig, resolve(compose_train("train.steps=many"))["train"], "train")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'"):
        to_dataclass(TrainConfig, {"stepz": 5}, "train")
    values = resolve(compose_train("head=clip_probe", "+head.colour=red"))["head"]
    with pytest.raises(ConfigError, match="unknown config key 'head.colour' for the clip_probe head"):
        head_spec(values, "object")
    with pytest.raises(ConfigError, match=r"concept.name is not set; pass --concept"):
        resolve(compose_config("train", [], CONFIGS), {"concept.name": "; pass --concept NAME"})


def test_config_dir_comes_from_the_environment_first(tmp_path, monkeypatch):
    monkeypatch.setenv("MYVLM_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="MYVLM_CONFIG_DIR .* is not a myvlm config folder"):
        find_config_dir()
    (tmp_path / "train.yaml").write_text("concept: {name: x}\n")
    assert find_config_dir() == tmp_path.resolve()
    assert find_config_dir(str(CONFIGS)) == Path(CONFIGS).resolve()


def test_head_configs_repeat_the_heads_own_defaults():
    """clip_probe.yaml spells out ProbeTraining's defaults, and face.yaml options fit both face backends."""
    import inspect

    from myvlm.heads.clip_probe import DEFAULT_EXTRACTOR, ClipProbeHead, ProbeTraining
    from myvlm.heads.face import DlibFaceBackend, FacenetFaceBackend

    probe = resolve(compose_train("head=clip_probe"))["head"]
    assert ProbeTraining.from_dict(probe["training"]) == ProbeTraining()
    assert tuple(probe["crops"]) == inspect.signature(ClipProbeHead).parameters["crops"].default
    assert probe["feature_extractor"] == DEFAULT_EXTRACTOR
    options = resolve(compose_train("head=face"))["head"]["backend_options"]
    for backend in (DlibFaceBackend, FacenetFaceBackend):
        assert set(options) <= set(inspect.signature(backend.__init__).parameters)
