"""Tests of the shared training loop: learning, exact resume, atomic checkpoints, errors, DDP, run files."""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kflow.train import (
    CKPT_FORMAT,
    InfiniteBatchSampler,
    TrainConfig,
    Trainer,
    load_model_weights,
    lr_at,
)
from kflow.utils import (
    CheckpointError,
    atomic_save,
    check_weights_only_safe,
    load_checkpoint,
    read_jsonl,
    resolve_device,
    save_checkpoint,
    to_device,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _load_worker():
    spec = importlib.util.spec_from_file_location("kflow_test_ddp_worker", HERE / "ddp_worker.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = _load_worker()


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path: Path, name: str, **kw) -> TrainConfig:
    base = {"steps": 20, "batch_size": 8, "lr": 5e-3, "warmup_steps": 3, "ema_decay": 0.9, "log_every": 2,
            "ckpt_every": 10, "device": "cpu", "run_dir": str(tmp_path / name), "progress": False}
    base.update(kw)
    return TrainConfig(**base)


def _trainer(cfg: TrainConfig, model_seed: int = 0, noise: float = 0.1, dropout: float = 0.1, **kw) -> Trainer:
    return Trainer(W.make_model(model_seed, dropout), W.make_loss_fn(noise), W.make_dataset(), W.collate, cfg,
                   **kw)


def _assert_state_equal(a, b, where="state"):
    """Bitwise equality of nested state dicts / lists / tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            _assert_state_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_state_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ----------------------------------------------------------------------------------- (1) + (6) learning, run files
def test_tiny_regression_learns_and_writes_run_files(tmp_path):
    cfg = _cfg(tmp_path, "learn", steps=100, lr=1e-2, warmup_steps=5, log_every=5, ckpt_every=50,
               keep_step_ckpts=True, ema_decay=0.95)
    evals = []

    def eval_fn(model, step):
        assert not model.training
        evals.append(step)
        data = W.collate(W.make_dataset())
        return {"eval_mse": torch.mean((model(data.x) - data.y) ** 2).item()}

    tr = _trainer(cfg, noise=0.0, dropout=0.0, eval_fn=eval_fn, eval_every=50, run_config={"task": "toy"})
    with torch.no_grad():
        data = W.collate(W.make_dataset())
        mse0 = torch.mean((tr.model(data.x) - data.y) ** 2).item()
    out = tr.fit()
    assert out["step"] == 100 and tr.step == 100
    assert evals == [50, 100]
    with torch.no_grad():
        mse_model = torch.mean((tr.model(data.x) - data.y) ** 2).item()
        mse_ema = torch.mean((tr.ema_model(data.x) - data.y) ** 2).item()
    assert mse_model < 0.2 * mse0, (mse0, mse_model)
    assert mse_ema < 0.3 * mse0, (mse0, mse_ema)
    assert out["eval_mse"] == pytest.approx(mse_ema, rel=1e-5)

    run = Path(cfg.run_dir)
    rows = read_jsonl(run / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(5, 101, 5))
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "mae", "epoch"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert train[-1]["loss"] < 0.3 * train[0]["loss"]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [50, 100]
    png = (run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    conf = json.loads((run / "config.json").read_text())
    assert conf["train"]["steps"] == 100 and conf["run"] == {"task": "toy"}
    assert TrainConfig.from_dict(conf["train"]) == cfg
    assert sorted(p.name for p in run.glob("*.pt")) == ["last.pt", "step_0000050.pt", "step_0000100.pt"]
    assert not list(run.glob(".*tmp"))
    # the checkpoint is plain data: loads with weights_only=True straight through torch.load
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["format"] == CKPT_FORMAT and ckpt["step"] == 100 and ckpt["run_config"] == {"task": "toy"}
    # inference loading picks the EMA weights
    fresh = W.make_model(seed=99)
    load_model_weights(fresh, run / "last.pt")
    _assert_state_equal(fresh.state_dict(), tr.ema_model.state_dict())


# ----------------------------------------------------------------------------------- (2) exact resume
class _Crash(Exception):
    pass


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    # noise + dropout: the resumed run must reproduce every random draw, not only the data order
    a = _trainer(_cfg(tmp_path, "straight"))
    a.fit()

    cfg_b = _cfg(tmp_path, "interrupted")
    calls = {"n": 0}
    base_loss = W.make_loss_fn(0.1)

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 14:  # dies after the step-10 checkpoint; steps 11-13 are logged then lost
            raise _Crash
        return base_loss(model, batch)

    b = Trainer(W.make_model(0, 0.1), crashing_loss, W.make_dataset(), W.collate, cfg_b)
    with pytest.raises(_Crash):
        b.fit()
    assert load_checkpoint(Path(cfg_b.run_dir) / "last.pt")["step"] == 10
    assert max(r["step"] for r in read_jsonl(Path(cfg_b.run_dir) / "metrics.jsonl")) == 12

    # a new process would rebuild the model from another seed: resume must overwrite everything
    c = _trainer(cfg_b, model_seed=7)
    out = c.fit(resume=True)
    assert out["step"] == 20
    _assert_state_equal(a.model.state_dict(), c.model.state_dict(), "model")
    _assert_state_equal(a.ema.state_dict(), c.ema.state_dict(), "ema")
    _assert_state_equal(a.optimizer.state_dict(), c.optimizer.state_dict(), "optimizer")
    # the log of the resumed run equals the uninterrupted one (lines after the checkpoint were dropped)
    la = [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(Path(a.cfg.run_dir) / "metrics.jsonl")]
    lc = [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(Path(cfg_b.run_dir) / "metrics.jsonl")]
    assert la == lc
    # and the test is not vacuous: a different seed gives different parameters
    d = _trainer(_cfg(tmp_path, "other_seed", seed=1))
    d.fit()
    assert not torch.equal(d.model[0].weight, a.model[0].weight)


def test_resume_can_extend_a_finished_run(tmp_path):
    a = _trainer(_cfg(tmp_path, "ext", steps=6, lr_schedule="constant", ckpt_every=0))
    a.fit()
    b = _trainer(_cfg(tmp_path, "ext", steps=12, lr_schedule="constant", ckpt_every=0))
    assert b.fit(resume="auto")["step"] == 12
    straight = _trainer(_cfg(tmp_path, "ext_straight", steps=12, lr_schedule="constant", ckpt_every=0))
    straight.fit(resume="auto")  # nothing to resume: starts fresh
    _assert_state_equal(straight.model.state_dict(), b.model.state_dict())


# ----------------------------------------------------------------------------------- (3) atomic checkpoints
def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, {"w": torch.arange(5.0), "step": 1})
    before = path.read_bytes()

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the temp file, then the writer dies
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.zeros(1000), "step": 2})
    monkeypatch.setattr(torch, "save", real_save)

    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left behind
    got = torch.load(path, weights_only=True)
    assert got["step"] == 1 and torch.equal(got["w"], torch.arange(5.0))


def test_non_weights_only_state_is_rejected_at_save_time(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\]\['mean'\].*numpy"):
        save_checkpoint(tmp_path / "x.pt", {"extra": {"mean": np.zeros(3)}})
    assert not (tmp_path / "x.pt").exists()
    check_weights_only_safe({"a": [1, 2.0, "s", None, (torch.ones(1), torch.float32)]})


def test_trainer_checkpoint_keeps_extra_state(tmp_path):
    # (also: a fresh run over an existing last.pt warns before overwriting it)
    cfg = _cfg(tmp_path, "extra", steps=4, ckpt_every=2)
    tr = _trainer(cfg, extra_state={"latent_mean": torch.tensor([1.0, 2.0]), "codec": "identity"})
    tr.fit()
    tr2 = _trainer(cfg, model_seed=3)
    tr2.extra_state.clear()
    tr2.fit(resume=True)
    assert tr2.extra_state["codec"] == "identity"
    assert torch.equal(tr2.extra_state["latent_mean"], torch.tensor([1.0, 2.0]))
    with pytest.warns(UserWarning, match="holds last.pt"):
        _trainer(cfg).fit()


# ----------------------------------------------------------------------------------- (4) bad checkpoints
def test_missing_checkpoint_names_the_file(tmp_path):
    missing = tmp_path / "nope" / "last.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_checkpoint(missing)
    tr = _trainer(_cfg(tmp_path, "nope"))
    with pytest.raises(FileNotFoundError, match="last.pt"):
        tr.fit(resume=True)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not_a_dict"])
def test_corrupt_checkpoint_names_the_file(tmp_path, damage):
    path = tmp_path / "run" / "last.pt"
    atomic_save({"w": torch.randn(100, 100)}, path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not a checkpoint\n" * 10)
    else:
        atomic_save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_foreign_or_mismatched_checkpoint_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "foreign", steps=2)
    save_checkpoint(Path(cfg.run_dir) / "last.pt", {"weights": torch.ones(1)})
    with pytest.raises(CheckpointError, match="not a kflow training checkpoint"):
        _trainer(cfg).fit(resume=True)
    _trainer(_cfg(tmp_path, "small", steps=2)).fit()
    big = Trainer(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1)), W.make_loss_fn(), W.make_dataset(), W.collate,
                  _cfg(tmp_path, "small", steps=4))
    with pytest.raises(CheckpointError, match=r"small.*last\.pt.*does not match"):
        big.fit(resume=True)


# ----------------------------------------------------------------------------------- helpers
def test_batch_sampler_is_resumable_sharded_and_covers_epochs():
    s = InfiniteBatchSampler(n=10, batch_size=4, seed=3)
    it = iter(s)
    stream = [next(it) for _ in range(10)]  # 40 indices = 4 epochs
    flat = [i for b in stream for i in b]
    for e in range(4):
        assert sorted(flat[10 * e:10 * e + 10]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation each epoch
    # fast-forward == the same stream
    it5 = iter(InfiniteBatchSampler(10, 4, seed=3, start_step=5))
    assert [next(it5) for _ in range(5)] == stream[5:]
    # shards of two ranks interleave back into the global batch
    r0 = iter(InfiniteBatchSampler(10, 4, seed=3, rank=0, world_size=2))
    r1 = iter(InfiniteBatchSampler(10, 4, seed=3, rank=1, world_size=2))
    for g in stream[:6]:
        a, b = next(r0), next(r1)
        assert a == g[0::2] and b == g[1::2]
    # batch larger than the dataset still works
    assert len(next(iter(InfiniteBatchSampler(3, 8, seed=0)))) == 8
    with pytest.raises(ValueError, match="divisible"):
        InfiniteBatchSampler(10, 5, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        InfiniteBatchSampler(0, 4)


def test_lr_schedule_shapes():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    const = TrainConfig(steps=100, lr=2.0, warmup_steps=0, lr_schedule="constant")
    assert {lr_at(s, const) for s in range(100)} == {2.0}


def test_config_validation_is_clear():
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="unknown trainer option.*'stpes'"):
        TrainConfig.from_dict({"stpes": 10})
    assert TrainConfig.from_dict({"betas": [0.9, 0.95]}).betas == (0.9, 0.95)


@dataclass(frozen=True)
class _Frozen:
    a: torch.Tensor
    name: str


class _HasTo:
    def __init__(self):
        self.moved_to = None

    def to(self, device, non_blocking=False):
        self.moved_to = torch.device(device)
        return self


def test_to_device_handles_nested_containers():
    from collections import OrderedDict, namedtuple

    NT = namedtuple("NT", "x y")
    obj = _HasTo()
    batch = {"t": torch.ones(2, dtype=torch.float64), "dc": _Frozen(torch.zeros(1), "n"),
             "l": [torch.ones(1), (torch.ones(1), 3)], "nt": NT(torch.ones(1), "s"), "o": obj,
             "od": OrderedDict(a=torch.ones(1)), "np": np.ones(2)}
    out = to_device(batch, "meta")
    assert out["t"].device.type == "meta" and out["t"].dtype == torch.float64
    assert out["dc"].a.device.type == "meta" and out["dc"].name == "n" and batch["dc"].a.device.type == "cpu"
    assert out["l"][0].is_meta and out["l"][1][0].is_meta and out["l"][1][1] == 3
    assert isinstance(out["nt"], NT) and out["nt"].x.is_meta
    assert out["o"].moved_to == torch.device("meta")
    assert isinstance(out["od"], OrderedDict) and out["od"]["a"].is_meta
    assert isinstance(out["np"], np.ndarray)


def test_to_device_moves_a_pyg_batch():
    tg = pytest.importorskip("torch_geometric")
    b = tg.data.Batch.from_data_list([tg.data.Data(x=torch.ones(3, 2)), tg.data.Data(x=torch.ones(2, 2))])
    out = to_device(b, "meta")
    assert out.x.is_meta and out.batch.is_meta


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu9")


def test_nonfinite_loss_is_skipped_then_reported(tmp_path):
    def nan_loss(model, batch):
        return model(batch.x).sum() * float("nan"), {}

    tr = Trainer(W.make_model(), nan_loss, W.make_dataset(), W.collate, _cfg(tmp_path, "nan", steps=4))
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="loss is nan"):
        tr.fit()
    _assert_state_equal(before, tr.model.state_dict())  # no step was taken with NaN gradients


# ----------------------------------------------------------------------------------- (5) DDP under torchrun
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_gloo(tmp_path):
    steps, batch = 6, 8
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(HERE / "ddp_worker.py"),
           str(run), str(steps), str(batch)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # rank 0 wrote the run files, once
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert (run / "last.pt").is_file() and (run / "loss.png").is_file() and (run / "config.json").is_file()
    assert load_checkpoint(run / "last.pt")["world_size"] == 2
    # both ranks hold the same parameters
    p0 = torch.load(run / "rank0_params.pt", weights_only=True)
    p1 = torch.load(run / "rank1_params.pt", weights_only=True)
    _assert_state_equal(p0, p1)
    # and they equal a single-process run on the same global batches (each rank got its half)
    single = Trainer(W.make_model(), W.make_loss_fn(), W.make_dataset(), W.collate,
                     W.ddp_config(str(tmp_path / "single"), steps, batch))
    single.fit()
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(p0[k], v, rtol=1e-5, atol=1e-6, msg=k)
    first = single.model[0].weight
    assert not torch.allclose(W.make_model()[0].weight, first)  # training moved the weights


def test_time_limit_stops_at_a_log_step_with_a_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "timed", steps=20, time_limit_s=1e-9, log_every=3)
    out = _trainer(cfg).fit()
    assert out["step"] == 3  # the limit is checked at log steps only, so every rank stops together
    assert load_checkpoint(Path(cfg.run_dir) / "last.pt")["step"] == 3
    resumed = _trainer(_cfg(tmp_path, "timed", steps=20, log_every=3)).fit(resume=True)
    assert resumed["step"] == 20


def test_jsonl_logger_truncates_on_resume_and_survives_a_torn_line(tmp_path):
    from kflow.utils import JsonlLogger, plot_curves

    path = tmp_path / "m.jsonl"
    log = JsonlLogger(path)
    for s in (1, 2, 3):
        log.log({"kind": "train", "step": s, "loss": torch.tensor(1.0 / s), "lr": np.float32(0.1)})
    log.log({"kind": "train", "step": 4, "loss": float("nan")})
    rows = read_jsonl(path)
    assert rows[0]["loss"] == 1.0 and isinstance(rows[0]["lr"], float) and rows[3]["loss"] is None
    with open(path, "a") as f:
        f.write('{"kind": "train", "st')  # a crash mid-write
    with pytest.warns(UserWarning, match="torn"):
        assert len(read_jsonl(path)) == 4
    with pytest.warns(UserWarning, match="torn"):
        JsonlLogger(path, truncate_after_step=2)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    assert plot_curves(path, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_curves(tmp_path / "absent.jsonl", tmp_path / "none.png") is None
    JsonlLogger(tmp_path / "r1.jsonl", enabled=False).log({"step": 1})
    assert not (tmp_path / "r1.jsonl").exists()



def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    """Output redirected (pytest captures stderr: no TTY): no bar, but plain lines with step, loss, throughput,
    elapsed time and ETA, at the first and last log step at least; the weights do not depend on it."""
    tr = _trainer(_cfg(tmp_path, "lines", steps=6, log_every=2, progress=True))
    tr.sample_unit = "clusters"
    tr.progress_every_s = 0.0  # a line at every log step
    tr.fit()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("train step ")]
    assert [ln.split()[2] for ln in lines] == ["2/6", "4/6", "6/6"]
    for ln in lines:
        assert "loss " in ln and " clusters/s" in ln and "elapsed " in ln and "ETA " in ln
    quiet = _trainer(_cfg(tmp_path, "quiet", steps=6, log_every=2, progress=False))
    quiet.fit()
    assert "train step" not in capsys.readouterr().err
    _assert_state_equal(tr.model.state_dict(), quiet.model.state_dict())

def test_loss_plot_single_eval_point_is_a_visible_marker_under_the_train_steps(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from kflow.utils import plot_curves

    path = tmp_path / "m.jsonl"
    rows = [{"kind": "train", "step": s, "loss": 10.0 / s, "lr": 1e-3} for s in range(10, 110, 10)]
    rows.append({"kind": "eval", "step": 100, "val_pm_atom": 4.2, "val_rot_median_deg": 133.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    figs = []
    orig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figs.append(self), orig(self, *a, **k))[1])
    plot_curves(path, tmp_path / "c.png")
    loss_ax, eval_ax = figs[0].axes[0], figs[0].axes[1]
    assert all(line.get_marker() == "o" and line.get_markersize() >= 5 for line in eval_ax.lines)
    assert eval_ax.get_xlim()[0] <= 10 and eval_ax.get_xlim() == loss_ax.get_xlim()  # not a lone point on its own axis
    lr_ax = figs[0].axes[-1]
    assert lr_ax.get_ylabel().startswith("lr")
    renderer = figs[0].canvas.get_renderer()
    box = lr_ax.yaxis.label.get_window_extent(renderer)
    assert box.x1 <= figs[0].bbox.width  # the lr label is inside the picture, not clipped
