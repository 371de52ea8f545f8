"""``python -m inferno`` / ``inferno``: compose the config with Hydra and run it.

Bad input ends with one line on stderr naming the key and what is allowed, exit status 2, no traceback: the
project's own checks (:class:`inferno.errors.ConfigError`) and Hydra's composition errors (an unknown option
of a group, an unknown key, a malformed override), which :func:`cli` reads from Hydra's exceptions.
``HYDRA_FULL_ERROR=1`` shows Hydra's own report with its stack trace instead."""

import os
import re
import sys

import hydra
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

import inferno.config  # noqa: F401  (registers the resolvers conf/ uses)
from inferno.config import CONF_DIR
from inferno.errors import ConfigError


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    from inferno.run import run

    try:
        return run(cfg)
    except ConfigError as e:
        fail(str(e))
    except OmegaConfBaseException as e:  # e.g. an interpolation that cannot be resolved
        fail(composition_message(e))


def fail(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def _first(text: str) -> str:
    return " ".join(str(text).strip().splitlines()[0].split()) if str(text).strip() else ""


def composition_message(e: BaseException) -> str:
    """One line from a Hydra / OmegaConf error: the key first, then what is allowed where the error knows it."""
    from hydra.errors import MissingConfigException, OverrideParseException

    cause = e.__cause__
    if isinstance(e, MissingConfigException) and e.options is not None and e.missing_cfg_file:
        group, _, option = str(e.missing_cfg_file).rpartition("/")
        return f"{group or option}: unknown option {option!r}; allowed: {', '.join(sorted(e.options))}"
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in str(e.missing_cfg_file):
        # an option in a list (logger=[csv,nope]): Hydra names the file but not the options
        group, _, option = str(e.missing_cfg_file).rpartition("/")
        if (CONF_DIR / group).is_dir():
            options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
            return f"{group}: unknown option {option!r}; allowed: {', '.join(options)}"
    if isinstance(e, OverrideParseException):
        why = [line for line in str(e).splitlines() if not line.startswith("Error parsing override")]
        return f"override {e.override!r}: {' '.join(' '.join(why).split()) or _first(e)}"
    err = cause if isinstance(cause, OmegaConfBaseException) else e
    key = getattr(err, "full_key", None)
    parent = getattr(err, "parent_node", None)
    if key and isinstance(err, (ConfigKeyError, ConfigAttributeError)) and parent is not None:
        allowed = ", ".join(map(str, parent.keys()))
        return f"{key}: unknown key; allowed: {allowed} (add a new key with +{key}=VALUE)"
    if key:
        return f"{key}: {_first(err)}"
    taken = re.search(r"An item is already at '([^']+)'", str(e))
    if taken:
        return f"{taken[1]}: already in the config; set it with {taken[1]}=VALUE (a leading + only adds new keys)"
    return "; ".join(filter(None, (_first(e), _first(cause) if cause is not None else "")))


def cli() -> None:
    """The command line (``python -m inferno`` and the ``inferno`` script): :func:`main` with Hydra's errors
    as one line."""
    from hydra.errors import HydraException

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return main()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises its errors instead of printing them in several lines
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        fail(composition_message(e))


if __name__ == "__main__":
    cli()
