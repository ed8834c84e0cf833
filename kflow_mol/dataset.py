"""Datasets for assembly: the registry (cod17-mini / 5k / 10k / all / a path), cached preparation, splits.

Preparing a cluster means: each copy's own body-frame coordinates, grouped into distinct *shapes* (mirror
images, Z' > 1 conformers; :mod:`kflow_mol.shapes`), the packed orientations ``R1`` and centroids ``c1`` of all
17 copies, the proper symmetry rotations of every shape (computed once per cluster), and the loose state (given by the data, or drawn with our
documented noise model :mod:`kflow_mol.noise`). Prepared clusters are cached on disk, keyed by the content
of the inputs and every setting that changes them.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kflow.utils import atomic_save, resource_dir

from .build import file_rng
from .cif import cluster_from_cif
from .data import BuildError, ClusterRecord
from .io import list_raw_ids, read_raw_pair
from .noise import LooseConfig, make_loose
from .prepared import PreparedCluster
from .shapes import SHAPE_TOL, find_shapes, shape_symmetries

OFFICIAL = {"cod17-5k": "5k", "cod17-10k": "10k", "cod17-all": "all"}
CACHE_VERSION = 3  # 2: per-copy rigid bodies (templates, copy_shape, body); 3: PreparedCluster fields only


def default_cache_dir() -> Path:
    return Path(os.environ.get("KFLOW_CACHE", Path.home() / ".cache" / "kflow"))


def mini_dir() -> Path:
    """The shipped ``cod17-mini`` CIFs (in the repo's ``datasets/``, or inside an installed package)."""
    root = resource_dir("datasets")
    if root is not None and (root / "cod17-mini" / "cifs").is_dir():
        return root / "cod17-mini"
    raise FileNotFoundError("cod17-mini is missing: expected datasets/cod17-mini/cifs in the checkout "
                            "or <prefix>/share/kflow/datasets (reinstall the package)")


def official_help(name: str, root: Path | None) -> str:
    where = root if root is not None else "<data root>"
    return (
        f"dataset '{name}' needs the official COD-Cluster17 raw files, which we cannot download for you.\n"
        f"  get them: the COD-Cluster17 release used by AssembleFlow (Liu et al. 2024 / ICLR 2025),\n"
        f"  put them: {where}/raw/FinalPositions/<id>_cluster16.csv and "
        f"{where}/raw/InitialPositions/<id>_cluster16_noised.csv, with the subset's id list as "
        f"{where}/{OFFICIAL.get(name, name)}_ids.txt (one id per line; without it every id is used),\n"
        f"  and pass --data-root {where} (or set KFLOW_DATA).\n"
        f"  comparable data from COD: download organic crystal CIFs from https://www.crystallography.net/cod/ "
        f"and run\n"
        f"    kflow-mol build-dataset --cif-dir CIFS --out DIR   then   --data DIR\n"
        f"  offline: --data cod17-mini works on a fresh clone.")


@dataclass
class DataSource:
    """Where the clusters come from: ``kind`` is ``cif`` (a folder of CIFs) or ``raw`` (official layout)."""

    name: str
    kind: str
    path: Path
    ids: list[str] | None = None


def resolve(data: str, data_root: str | os.PathLike | None = None) -> DataSource:
    """Resolve a registry name or a path to a :class:`DataSource`; clear errors say how to fix it."""
    root = Path(data_root) if data_root else (Path(os.environ["KFLOW_DATA"]) if os.environ.get("KFLOW_DATA") else None)
    if data == "cod17-mini":
        return DataSource(data, "cif", mini_dir() / "cifs")
    if data in OFFICIAL:
        if root is None or not (root / "raw" / "FinalPositions").is_dir():
            raise FileNotFoundError(official_help(data, root))
        id_file = root / f"{OFFICIAL[data]}_ids.txt"
        ids = [x.strip() for x in id_file.read_text().split() if x.strip()] if id_file.exists() else None
        return DataSource(data, "raw", root, ids)
    path = Path(data).expanduser()
    if (path / "raw" / "FinalPositions").is_dir() or path.name == "raw" and (path / "FinalPositions").is_dir():
        return DataSource(path.name, "raw", path if path.name != "raw" else path.parent)
    if path.is_dir() and any(path.glob("*.cif")):
        return DataSource(path.name, "cif", path)
    if path.is_dir() and (path / "cifs").is_dir():
        return DataSource(path.name, "cif", path / "cifs")
    raise FileNotFoundError(
        f"--data '{data}': not a known dataset (cod17-mini, cod17-5k, cod17-10k, cod17-all) and not a folder "
        f"of CIFs or of official raw files (raw/FinalPositions/*.csv). Build one with "
        f"`kflow-mol build-dataset --cif-dir DIR --out OUT`.")


def _fingerprint(files: list[Path], settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:".encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def load_records(source: DataSource, progress: bool = True,
                 min_packing: float | None = None) -> tuple[list[ClusterRecord], list[dict]]:
    """Read every cluster of a source; returns ``(records, rejected)`` (rejections with their reasons).

    ``min_packing``: for CIF folders, reject cells whose packing coefficient is below it (``loose_packing``,
    as ``build-dataset`` does; e.g. P1 files holding fewer molecules than their declared Z); None: no check.
    """
    records, rejected = [], []

    def read(item_id, fn, *args):
        try:
            records.append(fn(*args))
        except BuildError as err:
            rejected.append({"id": item_id, "reason": err.reason, "message": str(err)})
        except Exception as err:  # noqa: BLE001 -- one bad file must never stop the rest of a batch
            rejected.append({"id": item_id, "reason": "error", "message": f"{item_id}: {type(err).__name__}: {err}"})

    if source.kind == "raw":
        ids = source.ids if source.ids is not None else list_raw_ids(source.path)
        for cid in ids:
            read(cid, read_raw_pair, source.path, cid)
        return records, rejected
    files = sorted(source.path.glob("*.cif"))
    it = files
    if progress:
        it = tqdm(files, desc=f"cutting clusters ({source.name})", leave=False)
    for f in it:
        read(f.stem, partial(cluster_from_cif, min_packing=min_packing), f)
    return records, rejected


def rejection_summary(rejected: list[dict]) -> dict:
    """``{"count", "by_reason": {reason: count}, "items": rejected}`` of a dataset report's rejections."""
    by: dict[str, int] = {}
    for r in rejected:
        by[r["reason"]] = by.get(r["reason"], 0) + 1
    return {"count": len(rejected), "by_reason": dict(sorted(by.items())), "items": list(rejected)}


def prepare(record: ClusterRecord, noise_cfg=None, seed: int = 0,
            shape_tol: float | None = None) -> PreparedCluster:
    """Everything training and evaluation need for one cluster (:class:`kflow_mol.prepared.PreparedCluster`).

    Each copy is its own rigid body (:mod:`kflow_mol.shapes`): ``body (M, n, 3)`` with
    ``final_i = body_i @ R1_i^T + c1_i`` exactly; copies of one shape share ``templates[copy_shape[i]]`` and its
    automorphisms. A missing loose state is drawn with the noise model, seeded by ``seed`` and the cluster id.
    """
    final = np.asarray(record.final, dtype=np.float64)
    sh = find_shapes(final, SHAPE_TOL if shape_tol is None else shape_tol)
    initial = record.initial
    if initial is None:
        initial = make_loose(final, file_rng(seed, record.id), noise_cfg or LooseConfig())
    perms, rots, orders = shape_symmetries(record.species, sh.templates)
    return PreparedCluster(id=record.id, species=np.asarray(record.species, dtype=np.int64), final=final,
                           initial=np.asarray(initial, dtype=np.float64), R1=sh.R, c1=final.mean(1),
                           templates=sh.templates, copy_shape=sh.copy_shape, body=sh.body, shape_perms=perms,
                           shape_symmetries=rots, shape_orders=orders, mirror_of=sh.mirror_of)


def load_prepared(data: str, data_root=None, noise_cfg=None, seed: int = 0, cache_dir=None,
                  progress: bool = True, min_packing: float | None = None) -> tuple[list[PreparedCluster], dict]:
    """Prepared clusters of a dataset (cached) and a report ``{"source", "accepted", "rejected"}``
    (``min_packing``: see :func:`load_records`)."""
    source = resolve(data, data_root)
    files = sorted(source.path.glob("*.cif")) if source.kind == "cif" else \
        sorted((source.path / "raw").rglob("*.csv"))
    settings = {"v": CACHE_VERSION, "kind": source.kind, "ids": source.ids, "seed": seed,
                "noise": asdict(noise_cfg) if noise_cfg is not None else "default"}
    if min_packing is not None:  # only then, so that existing caches stay valid
        settings["min_packing"] = float(min_packing)
    cache = Path(cache_dir or default_cache_dir()) / f"{source.name}-{_fingerprint(files, settings)}.pt"
    if cache.exists():
        blob = torch.load(cache, weights_only=True)
        return [PreparedCluster.from_tensors(c) for c in blob["clusters"]], json.loads(blob["report"])
    records, rejected = load_records(source, progress=progress, min_packing=min_packing)
    clusters = []
    for r in records:
        try:
            clusters.append(prepare(r, noise_cfg, seed))
        except Exception as err:  # noqa: BLE001 -- one bad cluster must never stop the rest
            rejected.append({"id": r.id, "reason": "prepare_failed", "message": f"{r.id}: {type(err).__name__}: {err}"})
    if not clusters:
        raise BuildError(str(source.path), "empty_dataset",
                         f"no usable cluster in {source.path} ({len(rejected)} rejected; first: "
                         f"{rejected[0]['message'] if rejected else 'no input files'})")
    report = {"source": str(source.path), "kind": source.kind, "accepted": len(clusters), "rejected": rejected}
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"clusters": [c.to_tensors() for c in clusters], "report": json.dumps(report)}, cache)
    return clusters, report


def split_indices(n: int, seed: int = 0, fractions=(0.8, 0.1, 0.1)) -> dict[str, np.ndarray]:
    """Seeded 80/10/10 split (seeds 0, 42, 123 in the literature). Every split gets at least one item
    when ``n >= 3``."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(fractions[1] * n))) if n >= 3 else 0
    n_test = max(1, int(round(fractions[2] * n))) if n >= 3 else 0
    n_train = n - n_val - n_test
    return {"train": np.sort(perm[:n_train]), "val": np.sort(perm[n_train:n_train + n_val]),
            "test": np.sort(perm[n_train + n_val:])}
