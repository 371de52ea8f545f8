import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Offline by construction: this process refuses non-Unix sockets in every test (pytest-socket, `--disable-socket
# --allow-unix-socket` in pyproject's addopts), and so does every Python process a test starts (tests/offline/
# sitecustomize.py, loaded through PYTHONPATH).
OFFLINE_DIR = str(Path(__file__).parent / "offline")
os.environ["INFERNO_BLOCK_SOCKETS"] = "1"
os.environ["PYTHONPATH"] = os.pathsep.join([OFFLINE_DIR, *filter(None, [os.environ.get("PYTHONPATH")])])

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from inferno.config import CONF_DIR, data_dir


@pytest.fixture
def compose_cfg():
    """Compose ``conf/`` with overrides through Hydra's compose API (as the CLI would)."""

    def _compose(*overrides: str, return_hydra_config: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def shared_data():
    d = data_dir()
    if d is None or not os.path.isdir(d):
        pytest.skip("shared data folder not found (set INFERNO_DATA or put ../shared/data beside the project)")
    return d
