"""``python -m inferno`` / ``inferno``: compose the config with Hydra and run it."""

import sys

import hydra
from omegaconf import DictConfig

import inferno.config  # noqa: F401  (registers the resolvers conf/ uses)
from inferno.errors import ConfigError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from inferno.run import run

    try:
        return run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
