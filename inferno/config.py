"""Config resolvers that ``conf/`` uses; imported before Hydra composes anything."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

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
