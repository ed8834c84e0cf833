"""Every hydra config composes and instantiates (the library itself never imports hydra)."""
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from kflow.cli import compose, configs_dir, instantiate

CONFIGS = configs_dir()
GROUP_FILES = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent != CONFIGS)
TOP = sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def test_configs_found():
    assert GROUP_FILES and "mol" in TOP


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_group_option_instantiates(path):
    cfg = OmegaConf.load(path)
    if "_target_" not in cfg:
        assert len(cfg) > 0  # plain option groups (solver, data) are read by the CLIs
        return
    obj = instantiate(cfg)
    if OmegaConf.select(cfg, "_partial_"):
        # partial targets need data-dependent arguments: give them a plausible one
        target = cfg._target_
        if target.endswith("RigidKPath"):
            from kflow.schedule import BandSchedule

            obj = obj(schedule=BandSchedule())
        elif target.endswith("IdentityTransform"):
            obj = obj()
        else:
            obj = obj(event_shape=(4, 8, 8))
    assert obj is not None


@pytest.mark.parametrize("name", TOP)
def test_top_level_configs_compose(name):
    cfg = compose(name)
    assert len(cfg) > 0


@pytest.mark.parametrize("schedule", ["kflow", "flow", "hard"])
def test_mol_config_builds_model_and_task(schedule):
    from kflow_mol.pipeline import build_components

    model, task, noise = build_components(compose("mol", [f"schedule={schedule}", "model=mol_tiny"]))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert task.path.schedule.window == {"kflow": 0.3, "flow": 1.0, "hard": 0.1}[schedule]
    assert noise.expansion_mean > 0


def test_library_does_not_import_hydra():
    code = ("import sys, kflow, kflow.train, kflow.path, kflow_mol.task, kflow_mol.rigid, kflow_image, "
            "kflow_image.pipeline, kflow.utils; "
            "bad=[m for m in sys.modules if m.split('.')[0] in ('hydra','omegaconf')]; print(bad); "
            "sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_allowlist_is_the_configs_own_classes():
    from kflow.cli import allowed_targets, check_targets

    allowed = allowed_targets()
    assert {"kflow_mol.model.AssemblyNet", "kflow.schedule.BandSchedule", "kflow_mol.rigid.RigidKPath"} <= allowed
    assert all(t.split(".")[0] in ("kflow", "kflow_mol", "kflow_image") for t in allowed)
    for name in TOP:  # every composed config passes
        check_targets(compose(name), name)


@pytest.mark.parametrize("target", ["numpy.savetxt", "os.system", "kflow.train.Path", "kflow.train.Trainer",
                                    "kflow.utils.atomic_write_text", 42])
def test_allowlist_rejects_foreign_and_unused_targets(target):
    from kflow.cli import UnsafeConfigError, check_targets

    # re-exported foreign classes (kflow.train.Path is pathlib's) and our own non-config callables are refused
    with pytest.raises(UnsafeConfigError, match="stored.pt: refused to build"):
        check_targets({"model": {"_target_": "kflow_mol.model.AssemblyNet", "x": [{"_target_": target}]}},
                      "stored.pt")
