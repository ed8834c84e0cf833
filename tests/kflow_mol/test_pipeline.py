"""The molecule pipeline called as a library (what the benchmarks do), without the CLI."""
import pickle

import numpy as np

from kflow_mol import cli, pipeline
from kflow_mol.dataset import mini_dir
from kflow_mol.io import write_xyz
from kflow_mol.pipeline import Reference


def test_cli_reexports_the_pipeline():
    for name in ("DEFAULT_MODEL", "build_components", "load_model"):
        assert getattr(cli, name) is getattr(pipeline, name)


def test_read_input_says_what_is_known(tmp_path):
    cif = mini_dir() / "cifs" / "2000334.cif"
    crystal = pipeline.read_input(str(cif))
    assert crystal.reference is Reference.KNOWN and crystal.known and crystal.title == crystal.record.id
    assert crystal.source == str(cif)
    xyz = tmp_path / "cluster.extxyz"
    write_xyz(xyz, crystal.record.species, crystal.record.final)
    loose = pipeline.read_input(str(xyz))
    assert loose.reference is Reference.LOOSE_ONLY and not loose.known
    np.testing.assert_allclose(loose.record.initial, crystal.record.final, atol=1e-5)
    mol = pipeline.read_input(smiles="CCO", seed=0)
    assert mol.reference is Reference.NONE and mol.title == "SMILES CCO" and mol.record.final.shape[0] == 17
    # the CLI reads inputs in a worker process: the result travels pickled
    assert pickle.loads(pickle.dumps(loose)).reference is Reference.LOOSE_ONLY


def test_assemble_with_the_shipped_model(tmp_path):
    loaded = pipeline.load_model(None)
    model, task, noise, cfg, info, path = loaded  # older callers unpack six fields
    assert (model, task, noise, cfg, info) == (loaded.model, loaded.task, loaded.noise, loaded.cfg, loaded.info)
    assert path == pipeline.DEFAULT_MODEL
    solver = pipeline.solver_config(cfg, steps=2)
    assert solver.steps == 2 and solver.method == cfg.solver.method
    m = pipeline.assemble(pipeline.read_input(smiles="CCO"), loaded, tmp_path / "out", solver=solver)
    assert m["steps"] == 2 and m["model_calls"] == solver.evaluations and not m["reference_known"]
    for name in ("assembled.cif", "assembled.extxyz", "trajectory.extxyz", "loose.extxyz", "assembled.png",
                 "metrics.json"):
        assert (tmp_path / "out" / name).exists(), name
