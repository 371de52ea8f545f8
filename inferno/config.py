"""Config resolvers that ``conf/`` uses (imported before Hydra composes anything), and ``build``: a group's
node turned into its object by ``hydra.utils.instantiate``."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from inferno.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


def data_dir() -> str | None:
    """``INFERNO_DATA`` if set, else ``../shared/data`` beside the project when it exists, else None."""
    env = os.environ.get("INFERNO_DATA")
    if env:
        return env
    shared = ROOT.parent / "shared" / "data"
    return str(shared) if shared.is_dir() else None


OmegaConf.register_new_resolver("inferno_data_dir", data_dir, replace=True)
OmegaConf.register_new_resolver("inferno_root", lambda: str(ROOT), replace=True)


# Keys of each group's node that describe it rather than go to its ``_target_``'s constructor.
META_KEYS = {
    "model": ("name", "kind", "checkpoint"),
    "task": ("name", "kind", "metric", "in_channels", "num_classes"),
    "pruner": ("name", "kinds"),
}


def build(cfg: DictConfig, group: str, **kwargs):
    """``hydra.utils.instantiate`` on a group's node, without its descriptive keys."""
    return build_node(cfg[group], group, **kwargs)


def build_node(node: DictConfig, group: str, **kwargs):
    """``build`` for any node of a group's shape (e.g. a pruner nested in ``pruner=compare``)."""
    try:
        fields = OmegaConf.to_container(node, resolve=True)  # resolved here, where the root is in reach
        return instantiate(OmegaConf.create({k: v for k, v in fields.items() if k not in META_KEYS[group]}), **kwargs)
    except InstantiationException as e:  # keep our one-line message rather than Hydra's wrapper
        cause = e.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:  # a nested node's builder
            cause = cause.__cause__  # (e.g. pruner=compare's methods): the innermost error says what is wrong
        if isinstance(cause, ConfigError):
            raise cause from None
        # a builder's bad-value / missing-file error, or a value of the wrong type (a string where a number goes
        # fails the builder's comparisons with a TypeError): one line
        if isinstance(cause, (ValueError, OSError, TypeError)):
            raise ConfigError(config_message(group, cause)) from cause
        raise


def config_message(group: str, error: Exception) -> str:
    """``error``'s message on one line, prefixed with ``group: `` unless it already names a key of the group."""
    msg = " ".join(str(error).split()) or type(error).__name__
    return msg if msg.startswith((f"{group}:", f"{group}.")) else f"{group}: {msg}"
