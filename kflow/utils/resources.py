"""Where the shipped folders (``configs``, ``datasets``) and the read-only ``shared`` data folder live."""
from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["resource_dir", "shared_dir"]

#: the checkout (editable install): the folder holding ``kflow/``, ``configs/``, ``datasets/``
_CHECKOUT = Path(__file__).resolve().parents[2]


def resource_dir(name: str) -> Path | None:
    """A folder shipped beside the packages (``configs``, ``datasets``): the checkout's (editable install),
    else the copy a wheel installs under ``<prefix>/share/kflow/``; ``None`` if neither exists."""
    for cand in (_CHECKOUT / name, Path(sys.prefix) / "share" / "kflow" / name):
        if cand.is_dir():
            return cand
    return None


def shared_dir(explicit: str | os.PathLike | None = None, require: str | os.PathLike = "data") -> Path | None:
    """The ``shared`` folder (data and weights too large for the repository), or ``None`` if not found.

    The candidates, in order: ``explicit`` (a ``--shared`` flag), ``$KFLOW_SHARED``, and ``shared`` beside the
    checkout (``../shared``); the first that contains ``require`` (a folder or file inside it) wins.
    """
    cands = [Path(explicit)] if explicit else []
    if os.environ.get("KFLOW_SHARED"):
        cands.append(Path(os.environ["KFLOW_SHARED"]))
    cands.append(_CHECKOUT.parent / "shared")
    return next((c for c in cands if (c / require).exists()), None)
