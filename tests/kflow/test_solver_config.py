"""kflow.solver.SolverConfig: the solver config group as one validated object."""
from __future__ import annotations

import pytest
import yaml

from kflow.cli import configs_dir
from kflow.solver import SolverConfig


@pytest.mark.parametrize("name", ["exact", "euler", "heun"])
def test_every_solver_config_builds(name):
    cfg = yaml.safe_load((configs_dir() / "solver" / f"{name}.yaml").read_text())
    s = SolverConfig.from_dict(cfg)
    assert (s.method, s.steps, s.grid, s.source) == (name, cfg["steps"], cfg["grid"], cfg["source"])


def test_flags_override_and_none_keeps():
    s = SolverConfig.from_dict({"method": "heun", "steps": 10}, steps=None, grid="band")
    assert (s.method, s.steps, s.grid, s.source) == ("heun", 10, "band", "estimate")
    assert s.evaluations == 20 and s.replace(method="euler").evaluations == 10
    assert s.replace(steps=None, source="fixed") == SolverConfig("heun", 10, "band", "fixed")
    assert s.to_dict() == {"method": "heun", "steps": 10, "grid": "band", "source": "estimate"}


@pytest.mark.parametrize("bad", [{"method": "rk4"}, {"steps": 0}, {"steps": 2.5}, {"steps": True},
                                 {"grid": "log"}, {"source": "noise"}, {"kind": "uniform"}])
def test_bad_values_raise(bad):
    with pytest.raises(ValueError):
        SolverConfig.from_dict(bad)
