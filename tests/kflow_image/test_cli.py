"""`kflow-image` CLI smoke runs on CPU with tiny overrides."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from kflow_image.cli import build_parser, main

TINY = ["trainer=smoke", "data.limit=32", "model.depth=1", "model.hidden_size=32", "sample.per_class=1",
        "solver.steps=2"]


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("KFLOW_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "mnist"
    mp = pytest.MonkeyPatch()
    mp.setenv("KFLOW_CACHE", str(run.parent / "cache"))
    try:
        assert main(["train", "--run-dir", str(run), *TINY]) == 0
    finally:
        mp.undo()
    return run


def test_train_writes_run_dir_and_png(trained):
    for name in ("config.json", "metrics.jsonl", "loss.png", "last.pt", "samples.png"):
        assert (trained / name).is_file(), name
    with Image.open(trained / "samples.png") as im:
        assert im.format == "PNG" and im.size[0] > 32
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["run"]["data"]["name"] == "mnist" and cfg["train"]["steps"] == 4
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and all(r["loss"] > 0 for r in rows if r["kind"] == "train")


def test_resume_continues_to_more_steps(trained, tmp_path):
    import shutil
    run = tmp_path / "resumed"
    shutil.copytree(trained, run)
    assert main(["train", "--run-dir", str(run), "--resume", *TINY, "trainer.steps=6"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [2, 4, 6]


def test_sample_controls(trained, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(trained), "--out", str(out), "--n", "4", "--cfg-scale", "2",
                 "--class-drop-at", "0.3", "--classes", "1,7", "--steps", "2"]) == 0
    assert out.is_file()
    assert main(["sample", "--ckpt", str(trained / "last.pt"), "--out", str(tmp_path / "split.png"), "--n", "4",
                 "--split-bands", "0.5:1", "--rows", "2", "--steps", "2"]) == 0
    assert main(["sample", "--ckpt", str(trained), "--out", str(tmp_path / "sr.png"), "--n", "3",
                 "--restore", "data", "--degrade", "blur", "--steps", "2"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"psnr_observation", "psnr_restored"} <= set(info)
    with Image.open(tmp_path / "sr.png") as im:
        assert im.size[1] > 3 * 32  # clean, degraded and restored rows


def test_baseline_flag_and_bad_input(tmp_path, capsys):
    run = tmp_path / "base"
    assert main(["train", "--baseline", "--run-dir", str(run), *TINY, "trainer.steps=2"]) == 0
    cfg = json.loads((run / "config.json").read_text())["run"]
    assert cfg["schedule"]["window"] == 1.0 and cfg["transform"]["_target_"].endswith("IdentityTransform")
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "notanoverride"]) == 2  # bad input
    assert "key=value" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]


def test_help_documents_the_flags(capsys):
    parser = build_parser()
    for cmd, flags in [("train", ["--data", "--baseline", "--resume"]),
                       ("sample", ["--cfg-scale", "--class-drop-at", "--split-bands", "--restore"]),
                       ("evaluate", ["--json", "--n"])]:
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])
        text = capsys.readouterr().out
        assert all(f in text for f in flags), (cmd, text)


@pytest.mark.slow
def test_evaluate_json(trained, capsys):
    assert main(["evaluate", "--ckpt", str(trained), "--n", "8", "--steps", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for block in ("generated", "real_vs_real", "codec_reconstruction"):
        assert {"fid", "kid", "precision", "recall"} <= set(res[block])


def test_checkpoint_cannot_call_foreign_targets(trained, tmp_path, capsys):
    """A crafted checkpoint whose stored run config names ``numpy.savetxt`` (payload writes into tmp_path)."""
    import torch

    from kflow.utils import load_checkpoint

    blob = load_checkpoint(trained / "last.pt")
    marker = tmp_path / "payload_ran.txt"
    blob["run_config"]["schedule"] = {"_target_": "numpy.savetxt", "fname": str(marker), "X": [[1.0]]}
    evil = tmp_path / "evil.pt"
    torch.save(blob, evil)
    capsys.readouterr()
    rc = main(["sample", "--ckpt", str(evil), "--out", str(tmp_path / "g.png"), "--n", "2", "--steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists()
    assert rc == 2 and len(err) == 1 and str(evil) in err[0] and "numpy.savetxt" in err[0]


def test_training_is_reproducible_and_resume_is_exact(tmp_path):
    """Same command twice -> bitwise the same weights (initialisation included); a run stopped after step 2
    and resumed with --resume ends bitwise where the uninterrupted run ends."""
    import shutil

    import torch

    from kflow.utils import load_checkpoint

    def weights(run):
        ckpt = load_checkpoint(run / "last.pt")
        return {**{f"model.{k}": v for k, v in ckpt["model"].items()},
                **{f"ema.{k}": v for k, v in ckpt["ema"]["model"].items()}}

    def same(x, y):
        assert x.keys() == y.keys()
        assert not [k for k in x if not torch.equal(x[k], y[k])]

    args = ["train", *TINY, "+trainer.keep_step_ckpts=true"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main([*args, "--run-dir", str(a)]) == 0
    torch.manual_seed(12345)  # whatever the global RNG holds before the run must not matter
    assert main([*args, "--run-dir", str(b)]) == 0
    same(weights(a), weights(b))
    c.mkdir()  # what a run killed during step 3 leaves behind
    shutil.copy(a / "step_0000002.pt", c / "last.pt")
    assert main([*args, "--run-dir", str(c), "--resume"]) == 0
    same(weights(a), weights(c))


def test_unavailable_device_is_one_line(trained, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(trained), "--out", str(tmp_path / "g.png"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]
    assert main(["train", "--run-dir", str(tmp_path / "r"), *TINY, "trainer.device=cuda"]) == 2


def test_grids_have_one_labelled_row_per_class_and_npz(trained, tmp_path, capsys):
    import numpy as np

    rows_px = lambda n_rows: (2 + n_rows * (32 + 2)) * 2  # noqa: E731  (pad 2, tiles upscaled x2)
    with Image.open(trained / "samples.png") as im:  # train: sample.per_class=1 -> 10 rows of 1
        assert im.size[1] == rows_px(10) and im.size[0] > (2 + 34) * 2  # a label margin left of the tiles
    out, npz = tmp_path / "grid.png", tmp_path / "raw.npz"
    assert main(["sample", "--ckpt", str(trained), "--out", str(out), "--npz", str(npz), "--steps", "2"]) == 0
    with Image.open(out) as im:  # default: 8 per class, one row per class
        assert im.size[1] == rows_px(10) and im.size[0] > (2 + 8 * 34) * 2
    z = np.load(npz)
    assert z["images"].shape == (80, 1, 32, 32) and z["images"].dtype == np.float32
    assert 0 <= z["images"].min() and z["images"].max() <= 1
    assert sorted(np.bincount(z["labels"]).tolist()) == [8] * 10
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["npz"] == str(npz)


def test_damaged_checkpoints_are_one_line_exit_2(trained, tmp_path, capsys):
    import torch

    from kflow.utils import load_checkpoint

    raw = (trained / "last.pt").read_bytes()
    blob = load_checkpoint(trained / "last.pt")
    files = {"zero_byte": b"", "truncated": raw[: len(raw) // 2]}
    for name, data in files.items():
        (tmp_path / f"{name}.pt").write_bytes(data)
    no_data = {**blob, "run_config": {k: v for k, v in blob["run_config"].items() if k != "data"}}
    torch.save(no_data, tmp_path / "no_data.pt")
    wrong = {**blob, "model": {k: v[..., :1] for k, v in blob["model"].items()}, "ema": None}
    torch.save(wrong, tmp_path / "wrong_weights.pt")
    for name in ("zero_byte", "truncated", "no_data", "wrong_weights"):
        path = tmp_path / f"{name}.pt"
        capsys.readouterr()
        rc = main(["sample", "--ckpt", str(path), "--out", str(tmp_path / "g.png"), "--n", "2", "--steps", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and str(path) in err[0], (name, err)
