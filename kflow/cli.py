"""Helpers shared by the command-line interfaces: locate the hydra configs and compose them.

This is the CLI layer: the only place (with the two ``cli.py`` modules) that imports hydra.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def configs_dir() -> Path:
    """The ``configs/`` folder: ``$KFLOW_CONFIGS``, else the checkout's, else the wheel's ``share/kflow``."""
    from kflow.utils import resource_dir

    if os.environ.get("KFLOW_CONFIGS"):
        return Path(os.environ["KFLOW_CONFIGS"])
    found = resource_dir("configs")
    if found is not None:
        return found
    raise FileNotFoundError(
        "cannot find the hydra configs: install from a checkout (`pip install -e .`) or set KFLOW_CONFIGS "
        "to the repository's configs/ folder")


def compose(config_name: str, overrides: list[str] | None = None) -> Any:
    """Compose ``configs/<config_name>.yaml`` with hydra overrides (``key=value``, ``group=option``)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(configs_dir()), version_base=None):
            return hcompose(config_name=config_name, overrides=list(overrides or []))
    except HydraException as err:
        raise SystemExit(f"error: bad config override in {overrides}: {err}") from None


def to_container(cfg: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def instantiate(cfg: Any, **kwargs: Any) -> Any:
    from hydra.utils import instantiate as hinstantiate

    return hinstantiate(cfg, **kwargs)
