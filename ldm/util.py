"""Building modules from the original's YAML schema (`target:` + `params:`)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

# Only classes of this project and of torch.nn can be named by a config: a config file is data, and
# loading one must not import arbitrary code.
_ALLOWED_PREFIXES = ("ldm.", "cldm.", "torch.nn.")


def get_obj_from_str(target: str) -> Any:
    """Import `package.module.Name` from the allowed packages. The classes live at the module paths the
    original configs name, so no alias table is needed."""
    if not target.startswith(_ALLOWED_PREFIXES):
        raise ValueError(f"config target {target!r} is outside the allowed packages {_ALLOWED_PREFIXES}")
    module_name, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"config target {target!r} does not name a class of this project: {err}") from err


def to_plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (other values unchanged)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a requirement
        return value
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def instantiate_from_config(config: Mapping[str, Any], **overrides: Any) -> Any:
    """Build `config["target"](**config["params"], **overrides)`."""
    config = to_plain(config)
    if "target" not in config:
        raise KeyError(f"config has no 'target' key: {dict(config)}")
    params = dict(config.get("params") or {})
    params.update(overrides)
    return get_obj_from_str(config["target"])(**params)
