"""Batch builder: a folder of CIFs -> COD-Cluster17 raw layout + a per-file report.

Used by ``kflow-mol build-dataset``. Every input gets one line in ``report.jsonl``; a bad file is skipped
with its reason and never stops the batch or loses the good ones.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import signal
import sys
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cif import ORGANIC_ELEMENTS, cluster_from_cif
from .data import BuildError, ClusterRecord
from .io import write_raw_pair


@dataclass
class LooseNoise:
    """Picklable ``noise_fn`` wrapping :func:`kflow_mol.noise.make_loose` (the documented default model).

    Args:
        cfg: a ``kflow_mol.noise.LooseConfig`` (None = its defaults).
    """

    cfg: object | None = None

    def __call__(self, record: ClusterRecord, rng: np.random.Generator) -> np.ndarray:
        from .noise import make_loose

        return make_loose(record.final, rng, self.cfg)


def file_rng(seed: int, cluster_id: str) -> np.random.Generator:
    """Per-file generator: independent of worker count and processing order."""
    return np.random.default_rng([int(seed), zlib.crc32(cluster_id.encode())])


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    # remember it: a parser's broad `except` may swallow the exception and report a parse error instead
    _CTX["timed_out"] = True
    raise _Timeout()


_CTX: dict = {}


def _init(ctx: dict) -> None:
    """Pool initializer: the shared settings (with ``fork`` they are inherited, not pickled, so a
    lambda ``noise_fn`` works)."""
    _CTX.clear()
    _CTX.update(ctx)


def _process(path: str) -> dict:
    """Build one cluster and write it; returns the report row (never raises)."""
    out_dir, noise_fn, seed, kw, timeout = (_CTX[k] for k in ("out_dir", "noise_fn", "seed", "kw", "timeout"))
    path = Path(path)
    row = {"file": str(path), "id": path.stem, "status": "rejected", "reason": None, "message": None,
           "n_atoms": None, "seconds": None}
    t0 = time.perf_counter()
    # SIGALRM works in the main thread of a process: pool workers, or the caller when workers <= 1
    use_alarm = bool(timeout) and hasattr(signal, "setitimer") and _in_main_thread()
    old = None
    _CTX["timed_out"] = False
    timed_out = {"reason": "timeout", "message": f"{path}: rejected (timeout): took longer than {timeout} s"}
    try:
        if use_alarm:
            old = signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, float(timeout))
        rec = cluster_from_cif(path, **kw)
        if noise_fn is not None:
            rec.initial = np.asarray(noise_fn(rec, file_rng(seed, rec.id)), dtype=np.float64)
        rec.validate()
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
        write_raw_pair(out_dir, rec)
        row.update(status="accepted", n_atoms=rec.n_atoms, n_cell_molecules=rec.meta["n_cell_molecules"],
                   fit_rmsd_max=rec.meta["fit_rmsd_max"], shell_gap=rec.meta["shell_gap"],
                   n_mirror_copies=rec.meta["n_mirror_copies"], formula=rec.meta["formula"])
    except BuildError as e:
        if _CTX.get("timed_out"):
            row.update(timed_out)
        else:
            row.update(reason=e.reason, message=str(e))
    except _Timeout:
        row.update(timed_out)
    except Exception as e:  # noqa: BLE001 - one bad file must not stop the batch
        if _CTX.get("timed_out"):
            row.update(timed_out)
        else:
            row.update(reason="error", message=f"{path}: rejected (error): {type(e).__name__}: {e}",
                       traceback=traceback.format_exc(limit=3))
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if old is not None:
                signal.signal(signal.SIGALRM, old)
    row["seconds"] = round(time.perf_counter() - t0, 4)
    return row


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def build_dataset(cif_dir, out_dir, workers: int = 2, noise_fn: Callable | None = None, seed: int = 0,
                  max_atoms: int = 200, progress: bool = True, allow_mirror: bool = False,
                  allowed_elements=ORGANIC_ELEMENTS, timeout: float | None = 60.0, pattern: str = "*.cif",
                  noise: Callable | None = None) -> dict:
    """Build COD-Cluster17-style clusters from every CIF in a folder.

    Args:
        cif_dir: folder with ``*.cif`` (non-recursive; sorted by name).
        out_dir: output root; clusters go to ``out_dir/raw/FinalPositions`` (always) and
            ``out_dir/raw/InitialPositions`` (when ``noise_fn`` is given); plus ``report.jsonl`` and
            ``summary.json``.
        workers: processes (``<= 1`` runs in this process).
        noise_fn: ``noise_fn(record, rng) -> (17, n, 3)`` loose initial positions, e.g. :class:`LooseNoise`.
            Must be picklable when ``workers > 1`` and the start method is not ``fork``.
        seed: base seed; each file uses ``default_rng([seed, crc32(id)])``.
        max_atoms: largest accepted molecule.
        progress: show a tqdm bar.
        allow_mirror: accept racemic crystals (mirror-image copies), see :func:`cluster_from_cif`.
        allowed_elements: accepted element symbols.
        timeout: per-file limit in seconds (SIGALRM; None = no limit).
        pattern: glob for input files.
        noise: alias of ``noise_fn``.

    Returns:
        The summary dict (also written to ``summary.json``): counts per status and reason, ids, timings.

    Raises:
        BuildError: ``bad_input`` when ``cif_dir`` is not a folder or holds no CIF.
    """
    cif_dir, out_dir = Path(cif_dir), Path(out_dir)
    noise_fn = noise_fn if noise_fn is not None else noise
    if not cif_dir.is_dir():
        raise BuildError(cif_dir, "bad_input", "not a folder of CIF files")
    files = sorted(cif_dir.glob(pattern))
    if not files:
        raise BuildError(cif_dir, "bad_input", f"no files matching '{pattern}'")
    out_dir.mkdir(parents=True, exist_ok=True)
    kw = {"max_atoms": max_atoms, "allow_mirror": allow_mirror, "allowed_elements": frozenset(allowed_elements)}
    ctx_vars = {"out_dir": str(out_dir), "noise_fn": noise_fn, "seed": seed, "kw": kw, "timeout": timeout}
    jobs = [str(f) for f in files]
    t0 = time.perf_counter()
    rows: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=f"build {cif_dir.name}", unit="cif", file=sys.stderr)
    report_path = out_dir / "report.jsonl"
    with open(report_path, "w") as rep:
        def consume(it):
            for row in it:
                rows.append(row)
                rep.write(json.dumps(row) + "\n")
                rep.flush()  # a crash later still leaves the report of what was done
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(ok=sum(r["status"] == "accepted" for r in rows))

        if workers is None or workers <= 1:
            _init(ctx_vars)
            consume(map(_process, jobs))
        else:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else None)
            with ctx.Pool(processes=int(workers), initializer=_init, initargs=(ctx_vars,),
                          maxtasksperchild=200) as pool:
                consume(pool.imap(_process, jobs, chunksize=1))
    if bar is not None:
        bar.close()
    total = time.perf_counter() - t0
    reasons = Counter(r["reason"] for r in rows if r["status"] == "rejected")
    secs = np.array([r["seconds"] for r in rows])
    summary = {
        "cif_dir": str(cif_dir),
        "out_dir": str(out_dir),
        "n_files": len(rows),
        "accepted": sum(r["status"] == "accepted" for r in rows),
        "rejected": sum(r["status"] == "rejected" for r in rows),
        "reasons": dict(sorted(reasons.items())),
        "accepted_ids": [r["id"] for r in rows if r["status"] == "accepted"],
        "with_initial": noise_fn is not None,
        "seed": seed,
        "max_atoms": max_atoms,
        "allow_mirror": allow_mirror,
        "workers": workers,
        "seconds_total": round(total, 3),
        "seconds_per_file_mean": round(float(secs.mean()), 4),
        "seconds_per_file_max": round(float(secs.max()), 4),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
