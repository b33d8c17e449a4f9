"""Hydra configs at the command-line edge: find ``configs/``, compose it, turn it into dataclasses.

    cfg = compose_config("train", ["backbone=tiny", "backbone.name_or_path=/tmp/tiny", "train.steps=5"])
    backbone = to_dataclass(BackboneConfig, cfg.backbone, "backbone")
    head_name, head_kwargs = head_spec(cfg.head, kind="object")

Only the CLI imports this module (and Hydra): the library takes dataclasses and keywords.
Every mistake in a config name, key or value becomes one ``ConfigError`` line that names it.
The config folder is, in order: ``--config-dir``, ``$MYVLM_CONFIG_DIR``, the ``configs/``
folder of the source checkout next to the package.
"""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

CONFIG_ENV = "MYVLM_CONFIG_DIR"
CHECKOUT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("backbone", "head", "train", "task")


class ConfigError(ValueError):
    """A config name, key or value given on the command line is wrong; the message names it."""


@dataclass
class TaskConfig:
    name: str = "caption"  # caption | vqa
    prompt: Optional[str] = None  # captioning prompt, for backbones that take one; None = backbone default
    question: Optional[str] = None  # the question asked of every image (vqa)


def find_config_dir(explicit: Optional[str] = None) -> Path:
    """The folder holding ``train.yaml`` and the config groups."""
    for source, candidate in (("--config-dir", explicit), (CONFIG_ENV, os.environ.get(CONFIG_ENV))):
        if candidate:
            if not (Path(candidate) / "train.yaml").is_file():
                raise ConfigError(f"{source} {candidate} is not a myvlm config folder (no train.yaml in it)")
            return Path(candidate).resolve()
    if (CHECKOUT_CONFIGS / "train.yaml").is_file():
        return CHECKOUT_CONFIGS
    raise ConfigError(
        f"cannot find myvlm's configs/ folder (looked in {CHECKOUT_CONFIGS}); set {CONFIG_ENV}=/path/to/myvlm/configs "
        "or pass --config-dir"
    )


def group_options(group: str, directory: Path) -> list[str]:
    """The config names of one group, e.g. ``["blip2_opt_2.7b", "tiny", ...]`` for ``backbone``."""
    return sorted(p.stem for p in (directory / group).glob("*.yaml"))


def hydra_string(value: Any) -> str:
    """A value quoted for Hydra's override grammar (paths with spaces, '=', ',' stay one string)."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def hydra_list(values: Sequence[Any]) -> str:
    return "[" + ",".join(hydra_string(v) for v in values) + "]"


def _check_overrides(overrides: Sequence[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for override in overrides:
        if "=" not in override and not override.startswith("~"):
            raise ConfigError(f"unexpected argument {override!r}: config overrides are key=value (e.g. train.steps=50)")
        try:
            parser.parse_override(override)
        except HydraException as error:  # OverrideParseException, or the grammar's own
            reason = str(error).splitlines()[0]
            raise ConfigError(f"cannot parse override {override!r}: {reason} (quote values with spaces or '=')") from None


def _composition_error(error: Exception, overrides: Sequence[str], directory: Path) -> ConfigError:
    text = str(error)
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing and "/" in missing.group(1):
        group, option = missing.group(1).rsplit("/", 1)
        return ConfigError(
            f"no config {option!r} in group {group}/ (available: {', '.join(group_options(group, directory))})"
        )
    key = re.search(r"Could not (?:override|append to|delete from) '([^']+)'", text)
    if key:
        culprit = next((o for o in overrides if o.lstrip("+~").split("=")[0] == key.group(1)), key.group(1))
        hint = " (head=auto has no options: pick a head, e.g. head=clip_probe)" if key.group(1).startswith("head.") else ""
        return ConfigError(f"unknown config key {key.group(1)!r} in override {culprit!r}{hint}; "
                           "--print-config shows the keys")
    return ConfigError(text.splitlines()[0])


def compose_config(name: str, overrides: Sequence[str] = (), directory: Optional[Path] = None) -> Any:
    """Compose ``configs/<name>.yaml`` with Hydra's compose API and the given ``key=value`` overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    directory = directory or find_config_dir()
    _check_overrides(overrides)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(directory), version_base=None, job_name=f"myvlm_{name}"):
            return compose(config_name=name, overrides=list(overrides))
    except HydraException as error:
        raise _composition_error(error, overrides, directory) from None


def resolve(cfg: Any, hints: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The config as plain data, interpolations resolved; a missing value is one line (+ ``hints[key]``)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        key = getattr(error, "full_key", "") or str(error)
        raise ConfigError(f"{key} is not set{(hints or {}).get(key, '')}") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{getattr(error, 'full_key', '')}: {str(error).splitlines()[0]}") from None


def to_yaml(cfg: Any) -> str:
    """The config as YAML, interpolations resolved where they can be."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_yaml(cfg, resolve=True)
    except OmegaConfBaseException:
        return OmegaConf.to_yaml(cfg)


def to_dataclass(cls: type, values: Any, where: str) -> Any:
    """``values`` (DictConfig or dict) checked against dataclass ``cls``: unknown keys and bad types are errors."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", "") or getattr(error, "key", "")
        message = str(error).splitlines()[0]
        if "not in" in message:
            known = ", ".join(f.name for f in cls.__dataclass_fields__.values())
            raise ConfigError(f"unknown config key '{where}.{key}' (known: {known})") from None
        raise ConfigError(f"bad value for '{where}.{key}': {message}") from None


def head_spec(values: Any, kind: str) -> tuple[str, dict[str, Any]]:
    """``(registry name, constructor keywords)`` of the head a ``head/`` config describes."""
    from omegaconf import DictConfig, OmegaConf

    from myvlm.api import DEFAULT_HEADS
    from myvlm.heads import available_heads, head_class

    kwargs = OmegaConf.to_container(values, resolve=True) if isinstance(values, DictConfig) else dict(values)
    name = kwargs.pop("type", None) or DEFAULT_HEADS.get(kind)
    if name not in available_heads():
        raise ConfigError(f"head.type {name!r} is not a concept head (available: {', '.join(available_heads())})")
    parameters = inspect.signature(head_class(name).__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        known = [p for p in parameters if p != "self"]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise ConfigError(f"unknown config key 'head.{unknown[0]}' for the {name} head (known: {', '.join(known)})")
    return name, kwargs
