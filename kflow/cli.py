"""Helpers shared by the command-line interfaces: locate the hydra configs, compose them, build objects
from them through an allowlist, and the exit-code scheme.

This is the CLI layer: the only place (with the two ``cli.py`` modules) that imports hydra. It imports
nothing heavy at module level, so ``--help`` and argument errors stay fast.

Exit codes of both CLIs: ``0`` success, ``2`` bad input (a missing or rejected file, a bad argument or
override, an unusable model file or checkpoint, an unavailable device; one ``error: ...`` line on stderr),
``1`` internal failure (a bug: the traceback is printed for the report), ``141`` the reader of the output went
away (``kflow-mol inspect x.cif | head``: quiet, as a shell tool killed by SIGPIPE reports it).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_BROKEN_PIPE = 0, 1, 2, 141

#: the packages whose classes a config's ``_target_`` may name
OWN_PACKAGES = ("kflow", "kflow_mol", "kflow_image")


class InputError(Exception):
    """Bad user input (file, argument, model file, device): the CLIs print ``error: <message>`` and exit 2."""


class UnsafeConfigError(InputError):
    """A config names a ``_target_`` outside the allowlist (see :func:`allowed_targets`)."""


def _bad_input_types(extra: tuple) -> tuple:
    import sys

    types = [InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError]
    # error classes named "module.Class" count only once their module is loaded: naming them costs no import
    for t in (*extra, "kflow.utils.CheckpointError"):
        if isinstance(t, str):
            module, _, name = t.rpartition(".")
            t = getattr(sys.modules.get(module), name, None)
        if t is not None:
            types.append(t)
    return tuple(types)


def run_command(fn, args: Any, extra: list[str], bad_input: tuple = ()) -> int:
    """Run a CLI command under the exit-code scheme of the module docstring.

    Args:
        fn: ``fn(args, extra) -> exit code``.
        bad_input: more exception types that mean bad input: classes, or ``"module.Class"`` names (checked
            only if that module was imported, so naming one costs no import).

    Bad input (:class:`InputError`, missing files, unreadable checkpoints and ``bad_input``) becomes one
    ``error: ...`` line on stderr and :data:`EXIT_BAD_INPUT`; anything else is a bug and propagates with its
    traceback (exit 1).
    """
    import sys

    try:
        return fn(args, extra)
    except BrokenPipeError:
        # stdout's reader closed it: no traceback; point stdout at devnull so the flush at exit is quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as err:
        if not isinstance(err, _bad_input_types(bad_input)):
            raise
        # one line, even when a library's message (hydra's, torch's) spans several
        print("error: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip()), file=sys.stderr)
        return EXIT_BAD_INPUT


def check_overrides(extra: list[str], hint: str = "") -> None:
    """Refuse trailing arguments that are not hydra overrides (``key=value``): one error line, exit 2.

    Args:
        hint: appended to the message (e.g. where to read the command's help).
    """
    bad = [e for e in extra if "=" not in e]
    if bad:
        raise InputError(f"unrecognised arguments {bad}; hydra overrides look like key=value{hint}")


def check_device(name: str | None):
    """The ``torch.device`` for ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``), checked before any work.

    Raises:
        InputError: an unknown name, or CUDA requested where none is available (one line, exit 2).
    """
    from kflow.utils import resolve_device

    try:
        return resolve_device(name or "auto")
    except (RuntimeError, ValueError) as err:
        raise InputError(str(err)) from None


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
        raise InputError(f"bad config override in {overrides}: {err}") from None


def to_container(cfg: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


@functools.lru_cache(maxsize=4)
def _allowed_targets(root: str) -> frozenset[str]:
    import yaml

    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            if isinstance(node.get("_target_"), str):
                found.add(node["_target_"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for f in sorted(Path(root).rglob("*.yaml")):
        walk(yaml.safe_load(f.read_text(encoding="utf-8")))
    return frozenset(t for t in found if t.split(".")[0] in OWN_PACKAGES)


def allowed_targets() -> frozenset[str]:
    """The ``_target_`` classes a config may name: those of this package that the shipped configs use.

    Derived by scanning ``configs/`` (so a new option file extends it, and new constructor arguments need
    no change here), restricted to :data:`OWN_PACKAGES`. A stored config (inside ``model.pt`` or a
    checkpoint) is data other people hand out: anything else there, e.g. ``numpy.savetxt``, could write
    files on the user's disk when hydra calls it.
    """
    return _allowed_targets(str(configs_dir()))


def check_targets(cfg: Any, source: str = "config") -> None:
    """Raise :class:`UnsafeConfigError` unless every ``_target_`` in ``cfg`` (at any depth) is allowed.

    Beyond the name, the target must resolve to a class defined in this package (so a re-exported name such
    as ``kflow.train.Path`` cannot smuggle in a foreign class).

    Args:
        cfg: a dict/list tree or an OmegaConf container.
        source: what to name in the message (the file the config came from).
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    allowed = allowed_targets()

    def walk(node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            if "_target_" in node:
                target = node["_target_"]
                if not (isinstance(target, str) and target in allowed and _own_class(target)):
                    raise UnsafeConfigError(
                        f"{source}: refused to build {target!r} (at {where or 'top level'}): only this "
                        f"package's own classes used by the shipped configs may be named by _target_")
            for k, v in node.items():
                walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(cfg, "")


@functools.lru_cache(maxsize=None)
def _own_class(target: str) -> bool:
    import importlib

    module, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(obj, type) and obj.__module__.split(".")[0] in OWN_PACKAGES


def instantiate(cfg: Any, **kwargs: Any) -> Any:
    """Hydra ``instantiate`` restricted to :func:`allowed_targets` (checked over the whole tree first).

    Callers that load a config from a file run :func:`check_targets` with the file name first, so the
    message names it.

    Raises:
        UnsafeConfigError: a ``_target_`` outside the allowlist.
    """
    from hydra.utils import instantiate as hinstantiate

    check_targets(cfg)
    return hinstantiate(cfg, **kwargs)
