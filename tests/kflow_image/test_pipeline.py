"""kflow_image.pipeline: the typed library layer under the CLI (training, runs, sampling)."""
from __future__ import annotations

import pytest
import torch

from kflow.cli import compose, to_container
from kflow.solver import SolverConfig
from kflow.utils import shared_dir
from kflow_image import pipeline
from kflow_image.dit import DiT
from kflow_image.task import ImageFlowTask, build_transform

TINY = ["image/trainer@trainer=smoke", "data.limit=32", "model.depth=1", "model.hidden_size=32", "sample.per_class=1",
        "solver.steps=2", "trainer.progress=false"]


def test_task_sample_takes_the_solver_whole():
    """``sample(model, labels, solver)`` is the old keyword call with the solver's fields."""
    from kflow.schedule import BandSchedule

    torch.manual_seed(0)
    task = ImageFlowTask(build_transform("fourier", (2, 8, 8)), BandSchedule(0.4, "smoothstep"), num_classes=3)
    model = DiT(in_channels=2, input_size=8, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    y, x_0 = torch.tensor([0, 2]), torch.randn(2, 2, 8, 8)
    for solver in (SolverConfig("heun", 3, "band", "fixed"), SolverConfig("exact", 4, "uniform", "estimate")):
        new = task.sample(model, y, solver, x_0=x_0).x_1
        old = task.sample(model, y=y, x_0=x_0, steps=solver.steps, grid_kind=solver.grid, method=solver.method,
                          x0_mode=solver.source).x_1
        assert torch.equal(new, old)
    assert task.sample(model, y, SolverConfig(steps=5), x_0=x_0, steps=2).grid.numel() == 3  # keyword wins


def test_solver_config_reads_legacy_x0_mode():
    cfg = {"solver": {"method": "exact", "steps": 5, "grid": "uniform"}, "sample": {"x0_mode": "fixed"}}
    assert pipeline.solver_config(cfg).source == "fixed"
    cfg["solver"]["source"] = "estimate"
    assert pipeline.solver_config(cfg).source == "estimate"


def test_shared_dir_order(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "data").mkdir(parents=True)
    (b / "data" / "x.tar").parent.mkdir(parents=True)
    (b / "data" / "x.tar").write_bytes(b"")
    monkeypatch.setenv("KFLOW_SHARED", str(b))
    assert shared_dir() == b
    assert shared_dir(a) == a
    assert shared_dir(a, require="data/x.tar") == b  # the explicit folder lacks the file: next candidate
    assert shared_dir(a, require="no/such/file") is None


def test_train_then_load_run_gives_the_same_samples(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("KFLOW_CACHE", str(tmp_path / "cache"))
    cfg = to_container(compose("image", [*TINY, f"trainer.run_dir={tmp_path / 'run'}"]))
    run, summary = pipeline.train(cfg, log=lambda s: None)
    assert summary["step"] == 4 and (tmp_path / "run" / "samples.png").is_file()
    loaded = pipeline.load_run(tmp_path / "run", "cpu")
    assert loaded.solver == run.solver == SolverConfig("exact", 2, "uniform", "estimate")
    assert loaded.sampling == run.sampling and loaded.step == 4 and loaded.event_shape == (1, 32, 32)
    y = pipeline.labels_for(6, loaded.num_classes, [1, 7], "cpu")
    assert y.tolist() == [1, 7, 1, 7, 1, 7]
    a = pipeline.generate(run, y, 6, seed=3, batch_size=4)
    b = pipeline.generate(loaded, y, 6, seed=3, batch_size=4)
    assert a.shape == (6, 1, 32, 32) and torch.equal(a, b)
    heun = loaded.solver.replace(method="heun")
    assert not torch.equal(pipeline.generate(loaded, y, 6, seed=3, solver=heun), a)
    with pytest.raises(pipeline.InputError, match="outside"):
        pipeline.labels_for(2, loaded.num_classes, [10], "cpu")


def test_make_task_leaves_the_schedule_alone():
    from kflow.schedule import BandSchedule
    from kflow_image.task import make_task

    sch = BandSchedule(0.3, "smoothstep")
    task = make_task("fourier", (2, 8, 8), sch, fit_data=torch.randn(16, 2, 8, 8), energy_warp=True)
    assert sch.warp is None and task.schedule.warp is not None


def test_restore_images_methods_and_seed():
    from kflow.schedule import BandSchedule
    from kflow.transforms import FourierTransform
    from kflow_image.codecs import make_codec
    from kflow_image.sampling import degrade
    from kflow_image.task import band_mask

    torch.manual_seed(0)
    shape = (1, 16, 16)
    task = ImageFlowTask(build_transform("identity", shape), BandSchedule(1.0), num_classes=3)
    model = DiT(in_channels=1, input_size=16, patch_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    run = pipeline.ImageRun(make_codec("identity", channels=1), task, model.eval(), shape, 3, torch.device("cpu"),
                            SolverConfig(steps=4))
    obs = degrade(torch.rand(5, *shape, generator=torch.Generator().manual_seed(1)), "downsample", factor=4)
    a = pipeline.restore_images(run, obs, None, "bands", kappa_max=0.3, seed=2, batch_size=2)
    assert a.shape == obs.shape and torch.equal(a, pipeline.restore_images(run, obs, None, "bands", kappa_max=0.3,
                                                                           seed=2, batch_size=2))
    f = FourierTransform(shape)  # the baseline has no bands of its own: Fourier bands are pinned
    m = band_mask(f, 0.0, 0.3).expand_as(obs).bool()
    lat, lat_obs = run.codec.encode(a), run.codec.encode(obs)
    inside = (lat > -1 + 1e-3) & (lat < 1 - 1e-3)  # decoding clamps to [0, 1]; compare where it did not
    assert inside.float().mean() > 0.5
    b = pipeline.restore_images(run, obs, torch.tensor([0, 1, 2, 0, 1]), "sdedit", k_start=0.5, seed=2)
    assert b.shape == obs.shape and not torch.equal(a, b)
    assert (f(lat)[m] - f(lat_obs)[m]).abs().mean() < (f(lat)[~m] - f(lat_obs)[~m]).abs().mean()
    with pytest.raises(pipeline.InputError, match="restoration method"):
        pipeline.restore_images(run, obs, None, "ilvr")


def test_run_overrides_reach_the_solver_and_guidance(tmp_path):
    """``kflow-image sample ... solver.steps=3 sample.cfg_scale=2.5``: trailing overrides change the loaded run's
    sampler settings (read as YAML) and nothing else."""
    from kflow_image.pipeline import ImageRun, SampleConfig, solver_config

    cfg = {"solver": {"method": "euler", "steps": 20}, "sample": {"cfg_scale": 1.0}, "model": {"depth": 1}}
    run = ImageRun(None, None, None, (1, 8, 8), 10, "cpu", solver_config(cfg), SampleConfig.from_dict(cfg["sample"]),
                   cfg)
    new = run.with_overrides([("solver.steps", "3"), ("sample.cfg_scale", "2.5")])
    assert new.solver.steps == 3 and new.solver.method == "euler" and new.sampling.cfg_scale == 2.5
    assert new.cfg["model"] == {"depth": 1} and run.solver.steps == 20  # the original run is untouched
    assert new.default_count(None, grid=True) == 80 and new.default_count([3], grid=True) == 8
    assert new.default_count(None, grid=False) == 32
