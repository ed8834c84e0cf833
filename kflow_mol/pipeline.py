"""The molecule application as a library: model files, training, evaluation, reading one input and
assembling it.

``kflow-mol`` (:mod:`kflow_mol.cli`) only parses arguments, composes the hydra config and calls these
functions, the report functions at the end included (what each command prints); the benchmarks and the tests
call them too. Configs are the composed ``configs/mol.yaml`` (an OmegaConf
``DictConfig``, as :func:`kflow.cli.compose` returns it and :func:`load_model` rebuilds it from a model file).
Bad user input raises :class:`kflow.cli.InputError`. Progress lines go to ``log`` (default: stderr).

Typed objects: :class:`LoadedModel` (what a model file holds), :class:`ClusterData` (a prepared dataset),
:class:`TrainResult`, :class:`ClusterInput` (one input to assemble, with its :class:`Reference`),
:class:`kflow.solver.SolverConfig`.
"""
from __future__ import annotations

import enum
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from torch import nn

from kflow.cli import InputError, check_device, check_targets, instantiate, to_container
from kflow.solver import SolverConfig
from kflow.train import TrainConfig, Trainer
from kflow.utils import atomic_save, atomic_write_text, load_checkpoint, seed_everything

from .build import LooseNoise, deadline, run_limited
from .build import build_dataset as build_clusters
from .cif import cluster_from_cif
from .data import N_MOLECULES, BuildError, ClusterRecord
from .dataset import load_prepared, prepare, rejection_summary, split_indices
from .evaluate import clash_warning, pm_histogram, public, refine_positions, summary_line, verdict
from .evaluate import evaluate as evaluate_clusters
from .io import (
    molecule_from_smiles,
    read_cluster_xyz,
    read_raw_pair,
    read_single_molecule,
    write_cluster_cif,
    write_xyz,
)
from .limits import CifLimits
from .metrics import evaluate_cluster, intermolecular_clashes, oracle_floors
from .prepared import PreparedCluster
from .refine import RefineConfig
from .render import figure_text, render_clusters
from .rigid import NUM_NODE_FEATURES
from .task import AssemblyTask, Collator, make_batch

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_FORMAT",
    "ClusterData",
    "ClusterInput",
    "LoadedModel",
    "Reference",
    "TrainResult",
    "assemble",
    "assemble_file",
    "build_components",
    "build_dataset",
    "evaluate",
    "export_model",
    "inspect",
    "load_data",
    "load_model",
    "read_input",
    "report_assembly",
    "report_evaluation",
    "report_train",
    "solver_config",
    "train",
]

DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "default.pt"
MODEL_FORMAT = "kflow-mol-model-v1"

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


# --------------------------------------------------------------------------- config and model files
def build_components(cfg) -> tuple[nn.Module, AssemblyTask, Any]:
    """Model, task and noise config from a composed config."""
    model = instantiate(cfg.model, node_feature_dim=NUM_NODE_FEATURES)
    schedule = instantiate(cfg.schedule)
    path = instantiate(cfg.path)(schedule=schedule)
    task = AssemblyTask(path, symmetric_targets=cfg.symmetric_targets, rot_weight=cfg.rot_weight,
                        rot_late_weight=bool(cfg.get("rot_late_weight", False)),
                        shared_start=bool(cfg.get("shared_start", False)),
                        lattice_weight=float(cfg.get("lattice_weight", 0.0)),
                        state_noise=float(cfg.get("state_noise", 0.0)),
                        state_noise_rot=float(cfg.get("state_noise_rot", 0.0)),
                        lattice_start=cfg.get("lattice_start", False),
                        packing_targets=bool(cfg.get("packing_targets", False)))
    return model, task, instantiate(cfg.noise)


def solver_config(cfg, **flags) -> SolverConfig:
    """The config's ``solver`` block as one :class:`SolverConfig`, with a command's flags (``steps=``,
    ``method=``; ``None`` keeps the config's value): every command samples with all of it."""
    try:
        return SolverConfig.from_dict(dict(cfg.solver), **flags)
    except ValueError as err:
        raise InputError(f"solver: {err}") from None


def export_model(path: Path, model: nn.Module, cfg: dict, info: dict) -> Path:
    """A self-describing inference file: config (JSON) + weights, loadable with ``weights_only=True``."""
    return atomic_save({"format": MODEL_FORMAT, "config": json.dumps(cfg), "info": json.dumps(info),
                        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)


class LoadedModel(NamedTuple):
    """What :func:`load_model` returns (a named tuple: older callers unpack the six fields)."""

    model: nn.Module  # on the requested device, in eval mode
    task: AssemblyTask
    noise: Any  # the loose-state noise config (``kflow_mol.build.NoiseConfig``)
    cfg: Any  # the stored composed config (DictConfig)
    info: dict  # training facts: data, train_clusters, steps, train_ids
    path: Path  # the model file read


def load_model(ckpt: str | Path | None, device="cpu") -> LoadedModel:
    """Load ``model.pt`` (or a run directory holding one); ``None`` = the shipped default model."""
    # hydra and OmegaConf load here, not with this module: the library imports no hydra (docs/CONTRACTS.md)
    from hydra.errors import InstantiationException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    p = Path(ckpt) if ckpt else DEFAULT_MODEL
    if p.is_dir():
        p = p / "model.pt"
    if not p.exists():
        hint = ("the shipped default model is missing from this install; train one with "
                "`kflow-mol train --data cod17-mini`" if ckpt is None else "pass a run's model.pt")
        raise InputError(f"checkpoint {p} not found: {hint}")
    blob = load_checkpoint(p)
    if blob.get("format") != MODEL_FORMAT:
        raise InputError(f"{p} is not a kflow-mol model file (expected model.pt written by `kflow-mol train`)")
    try:
        stored, info = json.loads(blob["config"]), json.loads(blob.get("info") or "{}")
        if not isinstance(stored, dict) or not isinstance(info, dict):
            raise TypeError("config and info must be JSON objects")
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{p}: damaged model file: unreadable config ({type(err).__name__}: {err})") from None
    check_targets(stored, str(p))  # model files are shared: build only this package's own classes
    cfg = OmegaConf.create(stored)
    try:
        model, task, noise = build_components(cfg)
    except (InstantiationException, OmegaConfBaseException, KeyError, TypeError, ValueError) as err:
        raise InputError(f"{p}: its config does not describe a model this version can build "
                         f"({type(err).__name__}: {err})") from None
    try:
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise InputError(f"{p}: damaged model file: the weights do not match the model its config describes "
                         f"({type(err).__name__}: {str(err)[:300]})") from None
    return LoadedModel(model.to(device).eval(), task, noise, cfg, info, p)


# --------------------------------------------------------------------------- datasets
@dataclass
class ClusterData:
    """A prepared dataset (``dataset.load_prepared``) and the summary of the inputs it rejected."""

    name: str
    clusters: list[PreparedCluster]
    kind: str | None  # "cif" when the loose states are drawn from crystals (training may redraw them)
    rejected: dict  # dataset.rejection_summary: count, by_reason, items

    def split(self, seed) -> dict[str, list[PreparedCluster]]:
        """The seeded 80/10/10 ``train``/``val``/``test`` split (``dataset.split_indices``)."""
        return {k: [self.clusters[i] for i in idx] for k, idx in split_indices(len(self.clusters), seed).items()}

    def select(self, split: str, seed, limit: int = 0) -> list[PreparedCluster]:
        """The clusters of one split (``train``/``val``/``test``, or ``all``), the first ``limit`` (0 = all)."""
        clusters = self.clusters if split == "all" else self.split(seed)[split]
        return clusters[: limit or None]


def _own_noise(data: ClusterData, noise):
    """``noise`` when the loose states of ``data`` were drawn by it (clusters cut from CIFs), else None: the
    official data's loose states come from its own, unpublished model."""
    return noise if data.kind == "cif" else None


def load_data(name: str, root, noise, split_seed, log: Log = _stderr, min_packing: float | None = None) -> ClusterData:
    """Prepared clusters of a dataset; rejected inputs are logged in one line (count, reasons, the first).
    ``min_packing``: reject CIF cells packed looser than this (``data.min_packing``; None: no check)."""
    clusters, report = load_prepared(name, root, noise, seed=split_seed, min_packing=min_packing)
    rej = rejection_summary(report.get("rejected", []))
    if rej["count"]:
        reasons = ", ".join(f"{k} {v}" for k, v in rej["by_reason"].items())
        log(f"warning: {name}: {rej['count']} input(s) rejected ({reasons}); first: {rej['items'][0]['message']}")
    return ClusterData(name, clusters, report.get("kind"), rej)


# --------------------------------------------------------------------------- train and evaluate
@dataclass
class TrainResult:
    """The end of :func:`train`: the run folder, its ``model.pt`` and the test-split evaluation."""

    run_dir: Path
    model_path: Path | None  # None on the non-main processes of a distributed run
    test: dict | None  # evaluate result on the test split (None: no test clusters, or not the main process)
    step: int


def train(cfg, resume: bool = False, log: Log = _stderr) -> TrainResult:
    """Train the run a composed config describes: data split, trainer (validation on the EMA model), export
    ``model.pt``, then evaluate the test split into ``test_metrics.json`` and ``pm_hist.png``."""
    try:
        tcfg = TrainConfig.from_dict({k: v for k, v in to_container(cfg.trainer).items() if k != "_target_"})
    except ValueError as err:
        raise InputError(str(err)) from None
    check_device(tcfg.device)  # before the data is cut: a missing GPU is reported at once
    seed_everything(tcfg.seed)  # the model's initial weights too: identical commands give identical runs
    model, task, noise = build_components(cfg)
    data = load_data(cfg.data.name, cfg.data.root, noise, cfg.data.split_seed, log, cfg.data.get("min_packing"))
    split = data.split(cfg.data.split_seed)
    # train_limit: the first N of the seeded train split, a random subset (data-scaling curves); 0 = all
    train_set = data.select("train", cfg.data.split_seed, max(int(cfg.data.get("train_limit") or 0), 0))
    test = split["test"]
    val = split["val"][: max(cfg.eval_clusters, 0) or None]
    resample = bool(cfg.data.resample_loose) and data.kind == "cif"
    log(f"data {cfg.data.name}: {len(data.clusters)} clusters ({data.rejected['count']} inputs rejected), "
        f"split train/val/test = {len(train_set)}/{len(val)}/{len(test)}; model "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; run dir {tcfg.run_dir}")
    solver = solver_config(cfg)

    def eval_fn(ema_model, step):
        r = evaluate_clusters(ema_model, task, val, solver.replace(steps=min(solver.steps, 20)),
                              device=next(ema_model.parameters()).device)
        m = r["model"]
        return {"val_pm_atom": m["pm_atom"], "val_pm_atom_symmetry_aware": m["pm_atom_symmetry_aware"],
                "val_pm_center": m["pm_center"], "val_rot_median_deg": m["rot_median_deg"],
                "val_rot_within_10deg": m["rot_within_10deg"]}

    trainer = Trainer(model, task.loss, train_set, Collator(resample, noise, task.packing_targets), tcfg,
                      eval_fn=eval_fn if val else None, eval_every=int(cfg.eval_every),
                      run_config=to_container(cfg))
    trainer.sample_unit = "clusters"  # progress lines: "... 3.2 clusters/s ..."
    trainer.fit(resume=resume)
    run = Path(tcfg.run_dir)
    if not trainer.is_main:
        return TrainResult(run, None, None, trainer.step)
    ema = trainer.ema_model
    info = {"data": cfg.data.name, "train_clusters": len(train_set), "steps": trainer.step,
            "train_ids": [c.id for c in train_set]}
    export_model(run / "model.pt", ema, to_container(cfg), info)
    res = None
    if test:
        res = evaluate_clusters(ema, task, test, solver, device=trainer.device,
                                expansion_mean=float(cfg.noise.expansion_mean), noise=_own_noise(data, noise))
        res["rejected"] = data.rejected
        atomic_write_text(run / "test_metrics.json", json.dumps(public(res), indent=1))
        pm_histogram(res, run / "pm_hist.png")
    return TrainResult(run, run / "model.pt", res, trainer.step)


def evaluate(loaded: LoadedModel, data: str, root, split_seed: int, split: str = "test", limit: int = 0,
             solver: SolverConfig | None = None, refine: bool = False, device="cpu", progress: bool = True,
             log: Log = _stderr, min_packing: float | None = None) -> dict:
    """Metrics of a loaded model on a dataset split (``train``/``val``/``test``/``all``), beside the floors.

    Args:
        loaded: the model (:func:`load_model`).
        data, root, split_seed: the dataset (``--data``, ``--data-root``, ``data.split_seed``).
        limit: only the first ``limit`` clusters (0 = all).
        solver: the sampler (default: the model's ``solver`` config).
        refine: also refine every assembled cluster, scored separately as ``model_refined``.
        min_packing: reject CIF cells packed looser than this (``data.min_packing``; None: no check).

    Returns:
        ``kflow_mol.evaluate.evaluate``'s result with ``checkpoint``, ``data``, ``split``, ``trained_on`` and
        ``rejected``.
    """
    cd = load_data(data, root, loaded.noise, split_seed, log, min_packing)
    clusters = cd.select(split, split_seed, limit)
    solver = solver or solver_config(loaded.cfg)
    res = evaluate_clusters(loaded.model, loaded.task, clusters, solver, device=device,
                            expansion_mean=float(loaded.noise.expansion_mean), noise=_own_noise(cd, loaded.noise),
                            progress=progress,
                            refine=RefineConfig() if refine else None)
    res.update(checkpoint=str(loaded.path), data=data, split=split, trained_on=loaded.info.get("data"),
               rejected=cd.rejected)
    return res


# --------------------------------------------------------------------------- one input
class Reference(enum.Enum):
    """What an input says about the packed cluster it should assemble into."""

    KNOWN = "known"  # a crystal CIF or an official CSV pair: the packed cluster is known and scored against
    NONE = "none"  # a single molecule or SMILES: 17 placeholder copies, nothing to score against
    LOOSE_ONLY = "loose-only"  # a 17-molecule XYZ/PDB cluster: its positions are the loose state, no reference


@dataclass(frozen=True)
class ClusterInput:
    """One input to assemble or inspect: its record, what is known of its packing, and how it was given."""

    record: ClusterRecord
    reference: Reference
    source: str  # the input file or the SMILES, as given
    smiles: str | None = None

    @property
    def known(self) -> bool:
        """The packed cluster is known: the result is scored against it."""
        return self.reference is Reference.KNOWN

    @property
    def title(self) -> str:
        return f"SMILES {self.smiles}" if self.smiles else self.record.id


def read_input(path: str | None = None, smiles: str | None = None, seed: int = 0,
               limits: CifLimits | None = None) -> ClusterInput:
    """The cluster of one input: a crystal CIF, an official CSV, a 17-molecule XYZ/extxyz/PDB cluster, a
    single molecule (SDF/MOL/XYZ) or a SMILES (``seed``: its RDKit conformer).

    ``path`` must be an existing file of a supported type (:func:`kflow_mol.limits.check_input_file`).
    """
    if smiles:
        species, pos = molecule_from_smiles(smiles, seed=seed)
        return ClusterInput(_single(species, pos, "smiles"), Reference.NONE, smiles, smiles)
    src = Path(path)
    suf = src.suffix.lower()
    if suf == ".cif":
        return ClusterInput(cluster_from_cif(src, limits=limits or CifLimits()), Reference.KNOWN, path)
    if suf == ".csv":
        root = src.parents[2] if src.parent.name in ("FinalPositions", "InitialPositions") else src.parent
        return ClusterInput(read_raw_pair(root, src.name.split("_cluster16")[0]), Reference.KNOWN, path)
    if suf in (".sdf", ".mol", ".mol2"):
        species, pos = read_single_molecule(src)
        return ClusterInput(_single(species, pos, src.stem), Reference.NONE, path)
    try:  # .xyz, .extxyz, .pdb: a 17-molecule cluster, else one molecule
        species, pos = read_cluster_xyz(src)
        rec = ClusterRecord(src.stem, np.asarray(species), np.asarray(pos), np.asarray(pos), {"source": str(src)})
        return ClusterInput(rec, Reference.LOOSE_ONLY, path)
    except BuildError as err:
        if err.reason != "bad_input":  # a 17-molecule cluster whose molecule breaks a rule (metal, ...)
            raise
        species, pos = read_single_molecule(src)
        return ClusterInput(_single(species, pos, src.stem), Reference.NONE, path)


def _single(species, pos, name) -> ClusterRecord:
    """A single molecule: ``N_MOLECULES`` copies on a loose cubic-ish arrangement to be packed (no reference)."""
    pos = np.asarray(pos, dtype=np.float64)
    pos = pos - pos.mean(0)
    r = np.linalg.norm(pos, axis=1).max() + 1.5
    g = np.array([(i, j, l) for i in (-1, 0, 1) for j in (-1, 0, 1) for l in (-1, 0, 1)], dtype=float)
    g = g[np.argsort(np.linalg.norm(g, axis=1), kind="stable")][:N_MOLECULES]
    final = pos[None] + 2 * r * g[:, None]  # a non-overlapping placeholder "packing": only the shapes matter
    return ClusterRecord(name, np.asarray(species, dtype=np.int64), final, None, {"source": name, "single": True})


def assemble(inp: ClusterInput, loaded: LoadedModel, out: str | Path, solver: SolverConfig | None = None,
             seed: int = 0, refine: bool = False, device="cpu", started: float | None = None,
             read_seconds: float = 0.0) -> dict:
    """Assemble one input and write ``assembled.cif``/``.extxyz``, ``trajectory.extxyz``, ``loose.extxyz``,
    ``assembled.png``, ``metrics.json`` (and ``refined.cif``/``.extxyz`` with ``refine``) into ``out``.

    Args:
        seed: seed of the loose state drawn for a CIF or molecule (the datasets' and ``inspect``'s draw).
        solver: the sampler (default: the model's ``solver`` config).
        started, read_seconds: ``time.perf_counter()`` when the command started and the time its input took
            to read, for ``seconds_total``/``seconds_read_input`` (default: now, 0).

    Returns:
        The ``metrics.json`` object.
    """
    started = time.perf_counter() if started is None else started
    record, known = inp.record, inp.known
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(record, loaded.noise, seed=seed)  # draws a missing loose state as inspect and the datasets do
    if inp.reference is Reference.LOOSE_ONLY:
        prep = prep.replace(initial=np.asarray(record.initial))
    batch = make_batch([prep]).to(device)
    solver = solver or solver_config(loaded.cfg)
    res = loaded.task.sample(loaded.model, batch, solver, return_trajectory=True)
    n = prep.num_atoms
    pos = res.positions[0, :, :n].double().cpu().numpy()
    traj = res.trajectory[:, 0, :, :n].double().cpu().numpy()  # (steps + 1, 17, n, 3)
    species = prep.species
    write_xyz(out / "assembled.extxyz", species, pos, comment=f"kflow-mol assembled {record.id}")
    write_cluster_cif(out / "assembled.cif", species, pos, name=f"{record.id}_assembled_cluster")
    write_xyz(out / "trajectory.extxyz", species, traj, comment="k-trajectory")
    write_xyz(out / "loose.extxyz", species, prep.initial, comment="loose input")
    metrics = {"id": record.id, "input": inp.source, "checkpoint": str(loaded.path),
               "model_trained_on": loaded.info.get("data"), "steps": solver.steps, "model_calls": res.evaluations,
               "seconds": res.seconds,
               "reference_known": known, "clashes": intermolecular_clashes(pos, species)}
    panels = {"loose": prep.initial, "assembled": pos}
    if known:
        metrics["model"] = evaluate_cluster(pos, prep.final, species, prep.copy_perms())
        metrics["floors"] = oracle_floors(prep.initial, prep.final, species, prep.copy_perms(),
                                          float(loaded.noise.expansion_mean))
        metrics["reference_clashes"] = intermolecular_clashes(prep.final, species)
        panels["reference"] = prep.final
    metrics["verdict"] = verdict(metrics.get("model", {}), metrics.get("floors", {}), metrics["clashes"])
    if refine:
        ref = refine_positions(pos, prep, RefineConfig())
        write_xyz(out / "refined.extxyz", species, ref, comment=f"kflow-mol assembled + refined {record.id}")
        write_cluster_cif(out / "refined.cif", species, ref, name=f"{record.id}_refined_cluster")
        metrics["refined"] = {"clashes": intermolecular_clashes(ref, species)}
        if known:
            metrics["refined"]["model"] = evaluate_cluster(ref, prep.final, species, prep.copy_perms())
        panels["refined"] = ref
    shown = {"loose": intermolecular_clashes(prep.initial, species), "assembled": metrics["clashes"]}
    shown.update({"reference": metrics["reference_clashes"]} if known else {})
    shown.update({"refined": metrics["refined"]["clashes"]} if "refined" in metrics else {})
    pm = {"loose": metrics["floors"]["do_nothing"], "assembled": metrics["model"],
          **({"refined": metrics["refined"]["model"]} if "refined" in metrics else {})} if known else {}
    subtitle, notes = figure_text(shown, pm, metrics.get("floors"))
    render_clusters(panels, species, out / "assembled.png", title=inp.title, subtitle=subtitle, notes=notes)
    metrics["seconds_total"] = time.perf_counter() - started  # reading, model, sampling, scoring, writing
    metrics["seconds_read_input"] = read_seconds
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, default=float))
    return metrics


def assemble_file(path: str | None, out: str | Path, smiles: str | None = None, ckpt: str | Path | None = None,
                  steps: int | None = None, seed: int = 0, refine: bool = False, device="cpu",
                  limits: CifLimits | None = None, timeout: float | None = None,
                  max_memory_gb: float | None = None, started: float | None = None) -> tuple[ClusterInput, dict]:
    """The ``assemble`` command: read one input, then load the model and :func:`assemble` it, within limits.

    A bad input is reported before the model loads: reading it (a CIF's symmetry expansion) runs in a forked
    worker that is memory-capped (``max_memory_gb``) and killed at the time limit; loading and assembling run
    under the same deadline (``timeout`` s for the whole command, from ``started``; None: no limits).

    Returns:
        ``(input, metrics)``: the input read and the ``metrics.json`` object (``seconds_read_input`` is the time
        the reading took).
    """
    started = time.perf_counter() if started is None else started
    what = path or f"SMILES '{smiles}'"
    inp = run_limited(read_input, path, smiles, seed, limits, timeout=timeout or None,
                      max_memory_gb=max_memory_gb or None, what=what)
    t_read = time.perf_counter() - started
    with deadline(max(timeout - (time.perf_counter() - started), 1e-3) if timeout else None, what):
        loaded = load_model(ckpt, device)
        metrics = assemble(inp, loaded, out, solver=solver_config(loaded.cfg, steps=steps), seed=seed, refine=refine,
                           device=device, started=started, read_seconds=t_read)
    return inp, metrics


def inspect(inp: ClusterInput, noise, png: str | Path | None = None, seed: int = 0) -> dict:
    """Describe one input (size, symmetry, rigid shapes; the floors when its packing is known) and render its
    loose and packed states into ``png`` (default: ``<id>_cluster.png``).

    Args:
        noise: the loose-state noise config; ``seed``: its draw (the same as ``assemble``'s).
    """
    record, known = inp.record, inp.known
    png = Path(png or f"{record.id}_cluster.png")
    prep = prepare(record, noise, seed=seed)
    x = prep.final
    c = x.mean(1)
    info = {"id": record.id, "molecules": int(x.shape[0]), "atoms_per_molecule": int(x.shape[1]),
            "formula": "".join(f"{s}{record.symbols.count(s)}" for s in sorted(set(record.symbols))),
            "cluster_radius_A": float(np.linalg.norm(c - c[0], axis=1).max()),
            "symmetry_order": len(prep.perms), "rigid_shapes": len(prep.templates)}
    fl = None
    if known:
        fl = oracle_floors(prep.initial, prep.final, prep.species, prep.copy_perms(),
                           float(noise.expansion_mean))
        info["do_nothing_pm_atom"] = fl["do_nothing"]["pm_atom"]
        info["do_nothing_pm_center"] = fl["do_nothing"]["pm_center"]
        info["undo_mean_expansion_pm_center"] = fl["undo_mean_expansion"]["pm_center"]
    subtitle, notes = figure_text(
        {"loose": intermolecular_clashes(prep.initial, prep.species),
         "packed": intermolecular_clashes(prep.final, prep.species)},
        {"loose": fl["do_nothing"]} if known else None, fl)
    render_clusters({"loose": prep.initial, "packed": prep.final}, prep.species, png, title=record.id,
                    subtitle=subtitle, notes=notes)
    info["picture"] = str(png)
    return info


# --------------------------------------------------------------------------- building a dataset
def build_dataset(cif_dir: str | Path, out: str | Path, noise=None, workers: int = 2, seed: int = 0,
                  max_atoms: int = 200, limits: CifLimits | None = None, timeout: float | None = None,
                  max_memory_gb: float | None = None, allow_mirror: bool = True, allow_conformers: bool = True,
                  min_packing: float | None = None, min_contact_ratio: float | None = None,
                  progress: bool = True) -> dict:
    """The ``build-dataset`` command: cut 17-molecule clusters from a folder of CIFs into the official layout
    (:func:`kflow_mol.build.build_dataset`).

    Args:
        noise: the loose-state noise config (None: write FinalPositions only).
        timeout, max_memory_gb, min_packing, min_contact_ratio: 0 or None = no limit, no check.

    Returns:
        The build summary, without its list of ids.
    """
    summary = build_clusters(cif_dir, out, workers=workers, noise_fn=None if noise is None else LooseNoise(noise),
                             seed=seed, max_atoms=max_atoms, progress=progress, limits=limits,
                             timeout=timeout or None, max_memory_gb=max_memory_gb or None,
                             allow_mirror=allow_mirror, allow_conformers=allow_conformers,
                             min_packing=min_packing or None, min_contact_ratio=min_contact_ratio or None)
    return {k: v for k, v in summary.items() if k not in ("ids",)}


# --------------------------------------------------------------------------- what kflow-mol prints
def _warn_clashes(name: str, res: dict, log: Log = _stderr) -> None:
    """A WARNING line when the result (assemble or evaluate) has intermolecular clashes."""
    warning = clash_warning(name, res["clashes"]) if "clashes" in res else None
    if warning:
        log(warning)


def report_evaluation(res: dict, split: str, name: str, as_json: bool = False, say: Log = print,
                      log: Log = _stderr) -> None:
    """Print an :func:`evaluate` result on ``say`` (one JSON object with ``as_json``, else the summary line, the
    verdict and the refined metrics when present), then a clash WARNING for ``name`` on ``log``."""
    if as_json:
        say(json.dumps(public(res)))
    else:
        lines = [summary_line(split, res), *res["verdict"]]
        if "model_refined" in res:
            r = res["model_refined"]
            lines.append(f"refined (reported separately): PM-atom {r['pm_atom']:.2f} Å (symmetry-aware "
                         f"{r['pm_atom_symmetry_aware']:.2f}), rotation median {r['rot_median_deg']:.1f}°, "
                         f"clashes {r['clashes']:.1f} per cluster")
        say("\n".join(lines))
    _warn_clashes(name, res, log)


def report_train(result: TrainResult, data: str, log: Log = _stderr) -> None:
    """Print the end of a :func:`train` run on ``log``: the test split's summary and clash warning, the model
    path (nothing on the non-main processes of a distributed run)."""
    if result.model_path is None:
        return
    if result.test is not None:
        report_evaluation(result.test, "test", f"{data} test", say=log, log=log)
    log(f"done: {result.model_path}")


def report_assembly(inp: ClusterInput, m: dict, out: str | Path, say: Log = print, log: Log = _stderr) -> None:
    """Print an :func:`assemble_file` result on ``say`` (scores when the packing is known, verdict, refined
    clashes, timings, the files written to ``out``), with a clash WARNING on ``log``."""
    if inp.known:
        say(f"{m['id']}: PM-atom {m['model']['pm_atom']:.2f} Å (symmetry-aware "
            f"{m['model']['pm_atom_symmetry_aware']:.2f}); do-nothing "
            f"{m['floors']['do_nothing']['pm_atom']:.2f} Å; {m['seconds']:.2f} s")
    say("\n".join(m["verdict"]))
    if "refined" in m:
        rm = m["refined"].get("model")
        say(f"refined (reported separately): {m['refined']['clashes']['clashes']} clashes"
            + (f", PM-atom {rm['pm_atom']:.2f} Å (symmetry-aware {rm['pm_atom_symmetry_aware']:.2f})" if rm else ""))
    _warn_clashes(m["id"], m, log)
    say(f"time: sampling {m['seconds']:.2f} s ({m['model_calls']} model evaluations); total "
        f"{m['seconds_total']:.2f} s (reading the input {m['seconds_read_input']:.2f} s)")
    say(f"wrote {Path(out)}/assembled.cif, assembled.extxyz, trajectory.extxyz, assembled.png, metrics.json")
