"""The configs (``conf/``): where they are, how they are composed outside a Hydra app, and what a wrong override
is told.

``conf/`` sits at the top of the source tree and ships inside the wheel as ``sdv2_lab/conf/`` (pyproject.toml
maps the package ``sdv2_lab.conf`` onto it), so the same lookup serves a checkout, an editable install and an
installed wheel. ``SDV2_CONF_DIR`` points elsewhere; a user's own config folders join with Hydra's
``hydra.searchpath=[file:///abs/my_conf]`` (their groups and experiments are then found beside ours).

Hydra answers an unknown key with "To append to your config use +foo=1", which would add a key nothing reads:
``compose_config`` (the API, ``run_v2v.sh``) and the command lines' check (``entry.check_command_line``) say
instead which key is unknown and the nearest valid ones (``difflib`` over the composed config's keys).
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Iterable, Optional

from omegaconf import DictConfig, OmegaConf


def conf_dir() -> Path:
    """The config folder: ``$SDV2_CONF_DIR``, else the one inside the installed package (a wheel), else the
    source tree's ``conf/`` beside the package (a checkout or an editable install)."""
    if os.environ.get("SDV2_CONF_DIR"):
        return Path(os.environ["SDV2_CONF_DIR"]).expanduser().resolve()
    here = Path(__file__).resolve().parent
    for folder in (here / "conf", here.parent / "conf"):
        if (folder / "config.yaml").is_file():
            return folder
    return here.parent / "conf"   # not found: compose_config / Hydra name this path


CONF_DIR = conf_dir()


def run_dir() -> str:
    """``${sdv2.run_dir:}`` (``paths.output_dir``): Hydra's run folder in a Hydra app; outside one (the API,
    ``run_v2v.sh``, a notebook's ``compose_config``) the working directory, so that every key resolves."""
    from hydra.core.hydra_config import HydraConfig
    return str(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else os.getcwd()


if not OmegaConf.has_resolver("sdv2.run_dir"):
    OmegaConf.register_new_resolver("sdv2.run_dir", run_dir)


def register_schemas() -> None:
    """The structured configs (``schema.py``) in Hydra's ConfigStore, where the groups' defaults lists find them
    (``conf/mode/pipe.yaml``: ``defaults: [pipe_schema, _self_]``). Done when this module is imported: before any
    composition, by ``compose_config`` and the command lines' Hydra apps alike."""
    from hydra.core.config_store import ConfigStore
    from .schema import SCHEMAS
    store = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        store.store(group=group, name=name, node=node)


register_schemas()


class ConfigError(ValueError):
    """A wrong override or config choice, said in one line (the command lines print it without a traceback)."""


def compose_config(name: str = "config", overrides: Optional[Iterable[str]] = None, *,
                   return_hydra_config: bool = False) -> DictConfig:
    """Compose a config from ``conf/`` outside of a Hydra app (API, tests, notebooks, ``run_v2v.sh``). A wrong
    override is a ``ConfigError`` naming it (an unknown key with the nearest valid ones)."""
    from hydra.errors import HydraException
    overrides = [str(o) for o in (overrides or [])]
    if not (CONF_DIR / f"{name}.yaml").is_file():
        raise FileNotFoundError(f"config {name}.yaml not found in {CONF_DIR} (set SDV2_CONF_DIR to a conf/ folder)")
    try:
        return _compose(name, overrides, return_hydra_config)
    except HydraException as exc:
        raise ConfigError(explain(exc, name, overrides)) from None


def _compose(name: str, overrides: list[str], return_hydra_config: bool) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=return_hydra_config)


# ---------------------------------------------------------------------------------------------- messages
def explain(exc: Exception, name: str, overrides: list[str]) -> str:
    """One line for a Hydra composition error: the override at fault and what to write instead."""
    from hydra.errors import MissingConfigException, OverrideParseException
    text = str(exc)
    if isinstance(exc, OverrideParseException):
        bad = next((o for o in overrides if _unparsable(o)), None)
        return f"cannot parse the override {bad!r}: {first_line(text)}" if bad else f"bad override: {first_line(text)}"
    if isinstance(exc, MissingConfigException) and getattr(exc, "missing_cfg_file", None):
        group, _, choice = str(exc.missing_cfg_file).rpartition("/")
        options = list(getattr(exc, "options", None) or [])
        if group and options:
            near = difflib.get_close_matches(choice, options, n=1, cutoff=0.5)
            return (f"{group}={choice}: no such choice" + (f" (did you mean {group}={near[0]}?)" if near else "")
                    + f"; {group} is one of: {', '.join(options)}")
        return f"config {exc.missing_cfg_file} not found in {CONF_DIR} (or the hydra.searchpath folders)"
    match = re.match(r"Could not override '([^']+)'", text)
    if match:
        return unknown_keys(name, overrides, match.group(1))
    match = re.match(r"Could not append to config\. An item is already at '([^']+)'", text)
    if match:
        key = match.group(1)
        given = _override_for(key, overrides) or f"+{key}=..."
        return f"{given}: {key} is already in the config; write {given.lstrip('+')} (no +)"
    return first_line(text)


def unknown_keys(name: str, overrides: list[str], first: str) -> str:
    """Every unknown key among ``overrides`` (``first`` is the one Hydra stopped at), each with the nearest
    valid keys of the config composed without them."""
    from hydra.errors import HydraException
    unknown, rest = [first], [o for o in overrides if _key_of(o) != first]
    cfg = None
    for _ in range(len(overrides) + 1):
        try:
            cfg = _compose(name, rest, False)
            break
        except HydraException as exc:
            match = re.match(r"Could not override '([^']+)'", str(exc))
            if not match:
                break
            unknown.append(match.group(1))
            rest = [o for o in rest if _key_of(o) != match.group(1)]
    parts = [_unknown_key(key, _override_for(key, overrides) or key, cfg) for key in unknown]
    return "; ".join(parts)


def _unknown_key(key: str, override: str, cfg: Optional[DictConfig]) -> str:
    value = override.split("=", 1)[1] if "=" in override else "..."
    if cfg is not None:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else None
        if isinstance(node, DictConfig) and node.get("_target_"):   # a constructor's arguments: open-ended
            return (f"{key} is not set in the config ({parent} is passed to {node._target_}); "
                    f"to pass it, write +{key}={value}")
        near = nearest_keys(key, config_keys(cfg, leaves_only=True))
        if near:
            return f"unknown key '{key}' ({override}): did you mean " + " or ".join(f"{k}={value}" for k in near) + "?"
    return f"unknown key '{key}' ({override}): the config has no such key (`sdv2 run --cfg job` lists them)"


def nearest_keys(key: str, keys: list[str], n: int = 2) -> list[str]:
    """The valid keys nearest to ``key``: its siblings by name first (``dataset.rot`` -> ``dataset.root``),
    else any key by its whole dotted path."""
    parent, _, leaf = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    siblings = {k[len(prefix):]: k for k in keys if k.startswith(prefix) and "." not in k[len(prefix):]}
    near = difflib.get_close_matches(leaf, list(siblings), n=n, cutoff=0.7)
    if near:
        return [siblings[k] for k in near]
    return difflib.get_close_matches(key, keys, n=n, cutoff=0.75)


def config_keys(cfg: DictConfig, leaves_only: bool = False) -> list[str]:
    """Every dotted key of a config (nodes and leaves, or leaves only), Hydra's own settings left out."""
    keys: list[str] = []

    def walk(node, prefix):
        for k, v in node.items():
            path = f"{prefix}{k}"
            if not (leaves_only and isinstance(v, dict)):
                keys.append(path)
            if isinstance(v, dict):
                walk(v, f"{path}.")
    walk(OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False), "")
    return [k for k in keys if not k.startswith("hydra")]


def first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split("@")[0]


def _override_for(key: str, overrides: list[str]) -> Optional[str]:
    return next((o for o in overrides if _key_of(o) == key), None)


def _unparsable(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    try:
        OverridesParser.create().parse_override(override)
        return False
    except HydraException:
        return True
