"""Batch builder: a folder of CIFs -> COD-Cluster17 raw layout + a per-file report.

Used by ``kflow-mol build-dataset``. Every input gets one line in ``report.jsonl``; a bad file is skipped
with its reason and never stops the batch or loses the good ones.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import pickle
import resource
import signal
import sys
import threading
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .cif import MIN_CONTACT_RATIO, MIN_PACKING, ORGANIC_ELEMENTS, CifLimits, cluster_from_cif
from .data import BuildError, ClusterRecord
from .io import write_raw_pair
from .noise import make_loose


@dataclass
class LooseNoise:
    """Picklable ``noise_fn`` wrapping :func:`kflow_mol.noise.make_loose` (the documented default model).

    Args:
        cfg: a ``kflow_mol.noise.LooseConfig`` (None = its defaults).
    """

    cfg: object | None = None

    def __call__(self, record: ClusterRecord, rng: np.random.Generator) -> np.ndarray:
        return make_loose(record.final, rng, self.cfg)


def file_rng(seed: int, cluster_id: str) -> np.random.Generator:
    """Per-file generator: independent of worker count and processing order."""
    return np.random.default_rng([int(seed), zlib.crc32(cluster_id.encode())])


# what the report says of every accepted crystal (ClusterRecord.meta keys of kflow_mol.cif.cluster_from_cif)
REPORT_FACTS = ("formula", "n_cell_molecules", "declared_z", "fit_rmsd_max", "shell_gap", "racemic", "n_mirror_copies",
                "n_conformers", "multiple_conformers", "n_cluster_shapes", "packing_coefficient", "cell_volume",
                "vdw_volume", "min_contact", "min_contact_atoms", "min_vdw_ratio")


# written into summary.json so the report explains itself
FACTS_EXPLAINED = {
    "racemic": "the cell holds both enantiomers; each is its own rigid shape (reject with --reject-racemic)",
    "n_conformers": "distinct conformers in the cell (Z' > 1 with different shapes: multiple_conformers; atom "
                    "order by bond-graph matching; reject with --reject-conformers)",
    "n_cluster_shapes": "distinct rigid shapes among the 17 copies (enantiomers and conformers)",
    "packing_coefficient": "van der Waals volume of the cell's molecules (Bondi, union of spheres) / cell volume; "
                           "organic crystals 0.65-0.80; below --min-packing: rejected (loose_packing)",
    "declared_z": "_cell_formula_units_Z of the file (fewer molecules in the cell: symmetry copies missing?)",
    "min_contact": "shortest intermolecular atom distance in the cluster (A), min_vdw_ratio the same as a fraction of "
                   "the van der Waals sum; below --min-contact-ratio: rejected (impossible_contact)",
}


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
        row.update(status="accepted", n_atoms=rec.n_atoms,
                   **{k: rec.meta[k] for k in REPORT_FACTS})
    except BuildError as e:
        if _CTX.get("timed_out"):
            row.update(timed_out)
        else:
            row.update(reason=e.reason, message=str(e))
    except _Timeout:
        row.update(timed_out)
    except MemoryError:
        lim = _CTX.get("max_memory_gb")
        row.update(reason="memory", message=f"{path}: rejected (memory): needed more than the per-file limit "
                   f"of {lim:g} GB" if lim else f"{path}: rejected (memory): out of memory")
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


def limit_memory(max_memory_gb: float | None) -> None:
    """Cap this process's address space at its current size plus ``max_memory_gb`` (``RLIMIT_AS``): an
    allocation beyond it raises ``MemoryError`` instead of swapping the machine. For worker processes."""
    if not max_memory_gb:
        return
    try:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        vm = 0
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    lim = int(vm + max_memory_gb * 2**30)
    if hard != resource.RLIM_INFINITY:
        lim = min(lim, hard)
    resource.setrlimit(resource.RLIMIT_AS, (lim, hard))


def _fork_context():
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else None)


def _child(conn, path: str, ctx: dict) -> None:
    """Worker process of one file: memory-capped, reports its row through ``conn``."""
    _init(ctx)
    limit_memory(ctx.get("max_memory_gb"))
    try:
        row = _process(path)
    except BaseException as e:  # noqa: BLE001 - whatever happens, the parent gets a row
        row = {"file": path, "id": Path(path).stem, "status": "rejected", "reason": "error",
               "message": f"{path}: rejected (error): {type(e).__name__}: {e}", "n_atoms": None, "seconds": None}
    conn.send(row)
    conn.close()


def _run_isolated(jobs: list[str], ctx_vars: dict, workers: int, timeout: float | None, grace: float = 2.0):
    """Each file in its own forked process (at most ``workers`` at once), memory-capped, killed (SIGKILL) when
    it runs ``grace`` s past ``timeout`` (the in-process alarm cannot interrupt compiled code); rows in input
    order."""
    import pymatgen.io.cif  # noqa: F401 - imported once here (seconds), inherited by every forked worker

    ctx = _fork_context()
    running: dict[int, tuple] = {}
    done: dict[int, dict] = {}
    nxt, emit = 0, 0
    try:
        while emit < len(jobs):
            while nxt < len(jobs) and len(running) < max(int(workers or 1), 1):
                r, w = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, args=(w, jobs[nxt], ctx_vars), daemon=True)
                proc.start()
                w.close()
                running[nxt] = (proc, r, time.perf_counter())
                nxt += 1
            wait([r for _, r, _ in running.values()] + [p.sentinel for p, _, _ in running.values()], timeout=0.5)
            now = time.perf_counter()
            for i, (proc, r, t0) in list(running.items()):
                row = None
                if r.poll():
                    try:
                        row = r.recv()
                    except (EOFError, OSError):
                        row = None
                    if row is None:
                        row = _dead_row(jobs[i], proc, now - t0, ctx_vars)
                elif not proc.is_alive():
                    row = _dead_row(jobs[i], proc, now - t0, ctx_vars)
                elif timeout and now - t0 > timeout + grace:
                    proc.kill()
                    row = _base_row(jobs[i], now - t0, "timeout", f"took longer than {timeout} s (killed)")
                if row is not None:
                    proc.join(1.0)
                    r.close()
                    del running[i]
                    done[i] = row
            while emit in done:
                yield done.pop(emit)
                emit += 1
    finally:
        for proc, r, _ in running.values():
            proc.kill()
            proc.join(1.0)


def _base_row(path: str, seconds: float, reason: str, detail: str) -> dict:
    return {"file": path, "id": Path(path).stem, "status": "rejected", "reason": reason,
            "message": f"{path}: rejected ({reason}): {detail}", "n_atoms": None, "seconds": round(seconds, 4)}


def _dead_row(path: str, proc, seconds: float, ctx_vars: dict) -> dict:
    proc.join(1.0)
    code = proc.exitcode
    if code is not None and code < 0 and -code == signal.SIGKILL:  # the kernel's OOM killer
        return _base_row(path, seconds, "memory", "the worker process was killed (SIGKILL: out of memory?)")
    return _base_row(path, seconds, "error", f"the worker process died (exit code {code})")


def run_limited(fn, *args, timeout: float | None = None, max_memory_gb: float | None = None, what: str = "input"):
    """``fn(*args)`` in a forked, memory-capped process that is killed after ``timeout`` s.

    Returns its result (picklable); re-raises its exception (a :class:`BuildError` keeps its reason).

    Raises:
        BuildError: ``timeout`` or ``memory`` naming ``what`` when a limit is hit.
    """
    ctx = _fork_context()
    r, w = ctx.Pipe(duplex=False)

    def target():
        limit_memory(max_memory_gb)
        try:
            out = ("ok", fn(*args))
        except MemoryError:
            out = ("memory", None)
        except BaseException as e:  # noqa: BLE001 - sent to the parent
            try:
                pickle.dumps(e)
                out = ("raise", e)
            except Exception:  # noqa: BLE001
                out = ("raise", RuntimeError(f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        w.send(out)
        w.close()

    proc = ctx.Process(target=target, daemon=True)
    proc.start()
    w.close()
    try:
        ready = wait([r, proc.sentinel], timeout=timeout)
        if r in ready or r.poll():
            try:
                kind, val = r.recv()
            except EOFError:
                kind, val = "died", None
        elif not ready:
            proc.kill()
            raise BuildError(what, "timeout", f"took longer than the time limit of {timeout:g} s")
        else:
            kind, val = "died", None
    finally:
        if proc.is_alive() and not r.poll():
            proc.kill()
        proc.join(5.0)
        r.close()
    if kind == "ok":
        return val
    if kind == "memory" or (kind == "died" and proc.exitcode == -signal.SIGKILL):
        raise BuildError(what, "memory", f"needed more than the memory limit of {max_memory_gb:g} GB"
                         if max_memory_gb else "out of memory")
    if kind == "died":
        raise RuntimeError(f"the worker process reading {what} died (exit code {proc.exitcode})")
    raise val


@contextlib.contextmanager
def deadline(seconds: float | None, what: str = "input"):
    """Raise :class:`BuildError` (``timeout``) in this thread when the block runs longer than ``seconds``
    (SIGALRM; interrupts Python code between operations, e.g. between torch calls). No-op without a limit,
    off the main thread or without ``setitimer``."""
    if not seconds or not hasattr(signal, "setitimer") or not _in_main_thread():
        yield
        return

    def handler(signum, frame):
        raise BuildError(what, "timeout", f"took longer than the time limit of {seconds:g} s (--timeout)")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _facts(rows: list[dict]) -> dict:
    """Counts over the accepted crystals: racemic, several conformers, several shapes in the cluster, and the
    range of packing coefficients and shortest contacts."""
    ok = [r for r in rows if r["status"] == "accepted"]
    pc = [r["packing_coefficient"] for r in ok if r.get("packing_coefficient") is not None]
    vr = [r["min_vdw_ratio"] for r in ok if r.get("min_vdw_ratio") is not None]
    return {"racemic": sum(bool(r.get("racemic")) for r in ok),
            "multiple_conformers": sum(bool(r.get("multiple_conformers")) for r in ok),
            "clusters_with_several_shapes": sum((r.get("n_cluster_shapes") or 1) > 1 for r in ok),
            "packing_coefficient_min": min(pc, default=None), "packing_coefficient_max": max(pc, default=None),
            "min_vdw_ratio_min": min(vr, default=None)}


def build_dataset(cif_dir, out_dir, workers: int = 2, noise_fn: Callable | None = None, seed: int = 0,
                  max_atoms: int = 200, progress: bool = True, allow_mirror: bool = True,
                  allowed_elements=ORGANIC_ELEMENTS, timeout: float | None = 60.0, pattern: str = "*.cif",
                  noise: Callable | None = None, limits: CifLimits | None = None,
                  max_memory_gb: float | None = 4.0, isolate: bool = True, allow_conformers: bool = True,
                  min_packing: float | None = MIN_PACKING,
                  min_contact_ratio: float | None = MIN_CONTACT_RATIO) -> dict:
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
        allow_mirror: accept racemic crystals (mirror-image copies: a fact in the report, ``racemic``);
            ``False`` rejects them (reason ``racemic``). See :func:`cluster_from_cif`.
        allow_conformers: accept Z' > 1 crystals of different conformers (``n_conformers`` in the report);
            ``False`` rejects them (reason ``multiple_conformers``).
        min_packing: reject cells with a packing coefficient below this (``loose_packing``; None: never).
        min_contact_ratio: reject clusters with an intermolecular contact below this fraction of the van der
            Waals sum (``impossible_contact``; None: never).
        allowed_elements: accepted element symbols.
        timeout: per-file limit in seconds (None = no limit): an alarm inside the worker, and the worker is
            killed 2 s later if compiled code ignored the alarm.
        pattern: glob for input files.
        noise: alias of ``noise_fn``.
        limits: caps checked before a CIF is expanded (default :class:`kflow_mol.cif.CifLimits`).
        max_memory_gb: address space each worker may add to what it starts with (``RLIMIT_AS``; None = no
            limit); a file that needs more is rejected with reason ``memory``.
        isolate: one forked worker process per file (the default; memory cap and kill apply). ``False`` runs
            in this process (``workers <= 1``) or a pool, with the alarm only.

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
    kw = {"max_atoms": max_atoms, "allow_mirror": allow_mirror, "allowed_elements": frozenset(allowed_elements),
          "limits": limits or CifLimits(), "allow_conformers": allow_conformers, "min_packing": min_packing,
          "min_contact_ratio": min_contact_ratio}
    ctx_vars = {"out_dir": str(out_dir), "noise_fn": noise_fn, "seed": seed, "kw": kw, "timeout": timeout,
                "max_memory_gb": max_memory_gb}
    jobs = [str(f) for f in files]
    t0 = time.perf_counter()
    rows: list[dict] = []
    bar = None
    if progress:
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

        if isolate:
            consume(_run_isolated(jobs, ctx_vars, workers, timeout))
        elif workers is None or workers <= 1:
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
        "allow_conformers": allow_conformers,
        "min_packing": min_packing,
        "min_contact_ratio": min_contact_ratio,
        "facts": _facts(rows),
        "facts_explained": FACTS_EXPLAINED,
        "workers": workers,
        "limits": {**asdict(kw["limits"]), "timeout_s": timeout, "max_memory_gb": max_memory_gb},
        "seconds_total": round(total, 3),
        "seconds_per_file_mean": round(float(secs.mean()), 4),
        "seconds_per_file_max": round(float(secs.max()), 4),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
