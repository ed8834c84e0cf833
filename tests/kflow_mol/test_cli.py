"""CPU smoke runs of every kflow-mol command on a few shipped crystals."""
import json
import shutil

import pytest

from kflow_mol.cli import main
from kflow_mol.dataset import mini_dir


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("cifs")
    for name in ("2000334", "2000583", "2000642", "2000724"):
        shutil.copy(mini_dir() / "cifs" / f"{name}.cif", d)
    return d


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    rc = main(["train", "--data", str(small), "--run-dir", str(run), "trainer=smoke", "model=mol_tiny",
               "solver.steps=3"])
    assert rc == 0
    return run


def test_train_writes_run_directory(trained):
    for name in ("config.json", "metrics.jsonl", "loss.png", "last.pt", "model.pt", "test_metrics.json"):
        assert (trained / name).exists(), name
    res = json.loads((trained / "test_metrics.json").read_text())
    assert res["model"]["pm_atom"] > 0 and res["do_nothing"]["pm_atom"] > 0



def test_train_limit_trains_on_the_first_clusters_of_the_split(trained, small, tmp_path):
    """data.train_limit=N (data-scaling curves): the first N clusters of the same seeded train split."""
    from kflow_mol.pipeline import load_model

    rc = main(["train", "--data", str(small), "--run-dir", str(tmp_path), "trainer=smoke", "model=mol_tiny",
               "solver.steps=3", "trainer.steps=2", "data.train_limit=1"])
    assert rc == 0
    full, part = load_model(trained / "model.pt").info, load_model(tmp_path / "model.pt").info
    assert full["train_clusters"] == 2 and part["train_clusters"] == 1
    assert part["train_ids"] == full["train_ids"][:1]

def test_resume_continues_to_more_steps(trained, small):
    rc = main(["train", "--data", str(small), "--run-dir", str(trained), "trainer=smoke", "model=mol_tiny",
               "solver.steps=3", "trainer.steps=6", "--resume"])
    assert rc == 0
    steps = [json.loads(line)["step"] for line in (trained / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert max(steps) == 6


def test_evaluate_json(trained, small, capsys):
    rc = main(["evaluate", "--ckpt", str(trained / "model.pt"), "--data", str(small), "--split", "all",
               "--steps", "2", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("model", "do_nothing", "centroid_oracle", "orientation_oracle", "symmetry_blind_oracle",
                "undo_mean_expansion", "seconds_per_cluster", "num_clusters", "steps"):
        assert key in res
    for key in ("pm_atom", "pm_center", "pm_atom_valid_ratio", "pm_atom_perm_invariant", "pm_atom_symmetry_aware",
                "collision", "separation", "collision_inter", "cluster_rmsd", "clashes", "min_contact"):
        assert key in res["model"], key
    # a symmetry order is counted, never averaged
    assert "symmetry_order" not in res["model"] and sum(res["symmetry_orders"].values()) == res["num_clusters"]
    c = res["clashes"]
    assert c["clash_fraction"] == 0.75 and c["reference_clusters_with_clashes"] == 0
    assert c["clusters_with_clashes"] == sum(r["clashes"] > 0 for r in res["per_cluster"])
    assert c["min_contact"] == min(r["min_contact"] for r in res["per_cluster"])
    assert res["verdict"][0].startswith("clashes: ") and "than the loose state" in res["verdict"][1]


def test_assemble_cif_and_smiles(trained, small, tmp_path, capsys):
    cif = sorted(small.glob("*.cif"))[0]
    out = tmp_path / "a"
    capsys.readouterr()
    assert main(["assemble", str(cif), "--out", str(out), "--ckpt", str(trained / "model.pt"), "--steps", "3"]) == 0
    for name in ("assembled.cif", "assembled.extxyz", "trajectory.extxyz", "assembled.png", "metrics.json"):
        assert (out / name).exists(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["reference_known"] and "pm_atom" in m["model"] and "do_nothing" in m["floors"]
    # the plain verdict: clashes and shortest contact (also of the reference), PM against the floors
    assert {"clashes", "clashing_molecules", "min_contact", "min_contact_atoms"} <= set(m["clashes"])
    assert m["reference_clashes"]["clashes"] == 0
    cap = capsys.readouterr()
    assert m["verdict"][0] in cap.out and "shortest intermolecular contact" in m["verdict"][0]
    assert any("than undoing the mean expansion" in line for line in m["verdict"])
    assert ("WARNING" in cap.err) == (m["clashes"]["clashes"] > 0)
    out2 = tmp_path / "b"
    assert main(["assemble", "--smiles", "Cc1ccccc1O", "--out", str(out2), "--ckpt", str(trained / "model.pt"),
                 "--steps", "2"]) == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert not m2["reference_known"] and "min_contact" in m2["clashes"] and len(m2["verdict"]) == 1


def test_bad_inputs_give_clear_errors(trained, tmp_path, capsys):
    assert main(["assemble", str(tmp_path / "missing.cif"), "--ckpt", str(trained / "model.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--data", "cod17-mini", "oops"]) == 2
    assert "hydra overrides look like key=value" in capsys.readouterr().err
    assert main(["train", "--data", "cod17-10k", "--data-root", str(tmp_path)]) == 2
    assert "official COD-Cluster17" in capsys.readouterr().err


def test_build_dataset_and_inspect(small, tmp_path, capsys):
    assert main(["build-dataset", "--cif-dir", str(small), "--out", str(tmp_path / "d"), "--workers", "1"]) == 0
    assert (tmp_path / "d" / "report.jsonl").exists()
    ids = sorted(p.name for p in (tmp_path / "d" / "raw" / "InitialPositions").glob("*.csv"))
    assert ids
    png = tmp_path / "pic.png"
    assert main(["inspect", str(sorted(small.glob("*.cif"))[0]), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.rfind("{\n"):])
    assert info["molecules"] == 17 and info["do_nothing_pm_atom"] > 0
    assert png.exists() and png.stat().st_size > 1000


@pytest.mark.parametrize("where", ["schedule", "nested_in_model"])
def test_model_file_cannot_call_foreign_targets(tmp_path, capsys, where):
    """A crafted model.pt that passes the weights-only loader names ``numpy.savetxt`` in its config: the
    payload (which would write a file into tmp_path) must never run, and the CLI says so in one line."""
    import torch

    from kflow.cli import EXIT_BAD_INPUT
    from kflow.utils import load_checkpoint
    from kflow_mol.pipeline import DEFAULT_MODEL

    blob = load_checkpoint(DEFAULT_MODEL)
    cfg = json.loads(blob["config"])
    marker = tmp_path / "payload_ran.txt"
    payload = {"_target_": "numpy.savetxt", "fname": str(marker), "X": [[1.0]]}
    if where == "schedule":
        cfg["schedule"] = payload
    else:  # an argument of an allowed class: hydra builds nested targets first
        cfg["model"]["extra"] = payload
    blob["config"] = json.dumps(cfg)
    evil = tmp_path / "evil.pt"
    torch.save(blob, evil)
    capsys.readouterr()
    rc = main(["assemble", "--smiles", "CCO", "--ckpt", str(evil), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists()
    assert rc == EXIT_BAD_INPUT
    assert len(err) == 1 and err[0].startswith("error: ") and str(evil) in err[0] and "numpy.savetxt" in err[0]


def _weights(run):
    """Trained and EMA weights of a run directory's last checkpoint."""
    from kflow.utils import load_checkpoint

    ckpt = load_checkpoint(run / "last.pt")
    return {**{f"model.{k}": v for k, v in ckpt["model"].items()},
            **{f"ema.{k}": v for k, v in ckpt["ema"]["model"].items()}}


def _assert_bitwise_equal(a, b):
    import torch

    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def test_training_is_reproducible_and_resume_is_exact(small, tmp_path):
    """Same command twice -> bitwise the same weights (initialisation included); a run stopped after step 2
    and resumed with --resume ends bitwise where the uninterrupted run ends."""
    import torch

    args = ["train", "--data", str(small), "trainer=smoke", "model=mol_tiny", "solver.steps=1",
            "+trainer.keep_step_ckpts=true"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main([*args, "--run-dir", str(a)]) == 0
    torch.manual_seed(12345)  # whatever the global RNG holds before the run must not matter
    assert main([*args, "--run-dir", str(b)]) == 0
    _assert_bitwise_equal(_weights(a), _weights(b))
    # what a run killed during step 3 leaves behind: the step-2 checkpoint as last.pt
    c.mkdir()
    shutil.copy(a / "step_0000002.pt", c / "last.pt")
    assert main([*args, "--run-dir", str(c), "--resume"]) == 0
    _assert_bitwise_equal(_weights(a), _weights(c))


def _bad_invocations(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "afile").write_text("x")
    cases = [
        (["assemble", str(tmp_path / "missing.cif")], "does not exist"),
        (["assemble", str(tmp_path)], "is a directory: give one file"),
        (["inspect", str(tmp_path)], "is a directory: give one file"),
        (["assemble", str(tmp_path / "notes.txt")], "unsupported input type '.txt'"),
        (["assemble", "--smiles", "C1CC("], "RDKit cannot parse the SMILES"),
        (["assemble", "--smiles", "[Na+].[Cl-]"], "rejected (metal): contains Na"),
        (["assemble", "--smiles", "C#C"], "rejected (flat_molecule)"),
        (["assemble", "--smiles", "CCO", "--timeout", "-1"], "--timeout must be >= 0"),
        (["assemble"], "give either an INPUT file or --smiles"),
        (["assemble", str(tmp_path / "missing.cif"), "--smiles", "CCO"], "give either an INPUT file or --smiles"),
        (["assemble", "--smiles", "CCO", "--out", str(tmp_path / "afile")], "is a file: give a folder"),
        (["assemble", "--smiles", "CCO", "--steps", "0"], "--steps must be >= 1"),
        (["evaluate", "--ckpt", str(tmp_path / "none.pt")], "not found"),
        (["build-dataset", "--cif-dir", str(tmp_path / "nodir"), "--out", str(tmp_path / "o")], "is not a directory"),
        (["train", "--data", "cod17-mini", "oops"], "hydra overrides look like key=value"),
        (["train", "--data", "cod17-mini", "trainer.nosuchkey=1"], "bad config override"),
        (["train", "--data", "cod17-mini", "trainer.steps=0"], "steps must be >= 1"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases += [(["assemble", "--smiles", "CCO", "--device", "cuda"], "CUDA is not available"),
                  (["train", "--data", "cod17-mini", "--device", "cuda", "--run-dir", str(tmp_path / "r")],
                   "CUDA is not available")]
    return cases


def test_bad_input_exit_code_2_and_one_line(tmp_path, capfd):
    """Exit-code scheme: every bad input gives exit 2 and exactly one `error:` line on stderr (file-descriptor
    level, so RDKit's own log would show), nothing on stdout."""
    for argv, fragment in _bad_invocations(tmp_path):
        rc = main(argv)
        out, err = capfd.readouterr()
        lines = err.strip().splitlines()
        assert rc == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (argv, err)
        assert not out.strip(), (argv, out)


def test_internal_failure_propagates_for_exit_code_1():
    """A bug is not disguised as bad input: run_command re-raises it (Python then exits 1 with the traceback)."""
    from kflow.cli import InputError, run_command

    def bug(args, extra):
        raise KeyError("oops")

    with pytest.raises(KeyError):
        run_command(bug, None, [])
    assert run_command(lambda a, e: (_ for _ in ()).throw(InputError("bad")), None, []) == 2


def test_closed_output_pipe_exits_quietly():
    """`kflow-mol inspect x.cif | head`: the reader closing stdout is exit 141 with nothing on stderr."""
    import subprocess
    import sys

    code = ("import sys; from kflow.cli import run_command\n"
            "def fn(a, e):\n    print('x' * 1000000); return 0\n"
            "sys.exit(run_command(fn, None, []))")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141 and "Traceback" not in err, err


def test_argument_errors_and_help_answer_before_heavy_imports(tmp_path):
    """`--help` and a missing file are answered before torch, numpy, RDKit or ASE are imported."""
    import subprocess
    import sys

    code = ("import sys\nfrom kflow_mol.cli import main\n"
            "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print([m for m in ('torch', 'numpy', 'rdkit', 'ase', 'hydra') if m in sys.modules])\nsys.exit(rc)")
    for argv, rc in ([["--help"], 0], [["assemble", "--help"], 0], [["assemble", str(tmp_path / "foo.cif")], 2],
                     [["inspect", str(tmp_path)], 2]):
        res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
        assert res.returncode == rc, res.stderr
        assert res.stdout.strip().splitlines()[-1] == "[]", (argv, res.stdout)


def _bad_model_files(d):
    """Crafted damaged model files: (name, path)."""
    import torch

    from kflow.utils import load_checkpoint
    from kflow_mol.pipeline import DEFAULT_MODEL

    raw = DEFAULT_MODEL.read_bytes()
    blob = load_checkpoint(DEFAULT_MODEL)
    files = {"zero_byte": b"", "truncated": raw[: len(raw) // 2], "random": bytes(range(256)) * 64}
    out = []
    for name, data in files.items():
        (d / f"{name}.pt").write_bytes(data)
        out.append((name, d / f"{name}.pt"))

    def save(name, obj):
        torch.save(obj, d / f"{name}.pt")
        out.append((name, d / f"{name}.pt"))

    save("a_list", [1, 2, 3])
    save("training_checkpoint", {"format": "kflow-train-v1", "model": {}})
    save("config_not_json", {**blob, "config": "{not json"})
    cfg = json.loads(blob["config"])
    save("config_without_model", {**blob, "config": json.dumps({k: v for k, v in cfg.items() if k != "model"})})
    save("config_wrong_argument", {**blob, "config": json.dumps({**cfg, "model": {**cfg["model"], "bogus": 1}})})
    save("weights_missing", {**blob, "state_dict": dict(list(blob["state_dict"].items())[1:])})
    save("weights_wrong_shape", {**blob, "state_dict": {k: v[..., :1] if v.ndim else v
                                                       for k, v in blob["state_dict"].items()}})
    return out


def test_damaged_model_files_are_one_line_exit_2(tmp_path, capfd):
    for name, path in _bad_model_files(tmp_path):
        rc = main(["assemble", "--smiles", "CCO", "--ckpt", str(path), "--out", str(tmp_path / "o"), "--steps", "1"])
        err = capfd.readouterr().err.strip().splitlines()
        assert rc == 2, (name, err)
        assert len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0], (name, err)


def test_damaged_resume_checkpoint_is_one_line_exit_2(small, tmp_path, capfd):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"\x00" * 100)
    rc = main(["train", "--data", str(small), "--run-dir", str(run), "trainer=smoke", "model=mol_tiny", "--resume"])
    err = [line for line in capfd.readouterr().err.strip().splitlines() if not line.startswith("data ")]
    assert rc == 2 and len(err) == 1 and str(run / "last.pt") in err[0], err


def _records(small, k=2):
    import numpy as np

    from kflow_mol.cif import cluster_from_cif
    from kflow_mol.noise import LooseConfig, make_loose

    recs = [cluster_from_cif(f) for f in sorted(small.glob("*.cif"))[:k]]
    for r in recs:
        r.initial = make_loose(r.final, np.random.default_rng(0), LooseConfig())
    return recs


def test_numerically_broken_inputs_are_one_line_exit_2(small, tmp_path, capfd):
    """NaN / 1e300 coordinates and a reference whose molecules sit on top of each other: exit 2, one line."""
    import numpy as np

    from kflow_mol.io import write_raw_pair, write_xyz

    rec = _records(small, 1)[0]
    bad = []
    for name, value in (("nan", np.nan), ("huge", 1e300)):
        x = rec.initial.copy()
        x[3, 0, 0] = value
        write_xyz(tmp_path / f"{name}.xyz", rec.species, x)
        bad.append((tmp_path / f"{name}.xyz", "coordinate"))
    stacked = type(rec)(rec.id, rec.species, np.repeat(rec.final[:1], 17, 0), None, {})
    stacked.final = stacked.final + np.arange(17)[:, None, None] * 1e-3  # write_raw_pair validates: bypass
    fpath = tmp_path / "stacked" / "raw" / "FinalPositions" / f"{rec.id}_cluster16.csv"
    fpath.parent.mkdir(parents=True)
    from kflow_mol.io import format_csv

    fpath.write_text(format_csv(rec.species, stacked.final))
    bad.append((fpath, "overlap"))
    write_raw_pair(tmp_path / "big", rec)
    ipath = tmp_path / "big" / "raw" / "InitialPositions" / f"{rec.id}_cluster16_noised.csv"
    lines = ipath.read_text().splitlines()
    lines[1] = ",".join(lines[1].split(",")[:2] + ["1e300", "0", "0"])
    ipath.write_text("\n".join(lines) + "\n")
    bad.append((ipath.parent.parent / "FinalPositions" / f"{rec.id}_cluster16.csv", "coordinate"))
    for path, fragment in bad:
        rc = main(["assemble", str(path), "--out", str(tmp_path / "o"), "--steps", "1"])
        err = capfd.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and fragment in err[0], (path, err)


def test_evaluate_reports_rejected_files_and_keeps_the_good_ones(trained, small, tmp_path, capsys):
    """A folder of official CSVs with two good clusters, a non-UTF-8 file and a malformed one: the two good
    clusters are evaluated, the two bad ones are counted with their reasons in the JSON and on stderr."""
    from kflow_mol.io import FINAL_SUFFIX, write_raw_pair

    root = tmp_path / "data"
    for r in _records(small, 2):
        write_raw_pair(root, r)
    final = root / "raw" / "FinalPositions"
    (final / f"latin1{FINAL_SUFFIX}").write_bytes("mol_idx,atom_type,x,y,z\n0,C,1.0,2.0,3.0 \xe9\n".encode("latin-1"))
    (final / f"header{FINAL_SUFFIX}").write_text("a,b,c\n")
    capsys.readouterr()
    rc = main(["evaluate", "--ckpt", str(trained / "model.pt"), "--data", str(root), "--split", "all",
               "--steps", "1", "--json"])
    cap = capsys.readouterr()
    assert rc == 0
    res = json.loads(cap.out.strip().splitlines()[-1])
    assert res["num_clusters"] == 2
    assert res["rejected"]["count"] == 2 and res["rejected"]["by_reason"] == {"bad_csv": 2}
    assert {r["id"] for r in res["rejected"]["items"]} == {"latin1", "header"}
    assert any("not UTF-8" in r["message"] for r in res["rejected"]["items"])
    assert "2 input(s) rejected (bad_csv 2); first: " in cap.err


def test_cluster_ids_are_confined_to_the_data_root(tmp_path):
    from kflow_mol.data import BuildError
    from kflow_mol.io import raw_paths

    for cid in ("/etc/passwd", "../../secret", "a/b", ".."):
        with pytest.raises(BuildError, match="not a plain name"):
            raw_paths(tmp_path, cid)
    assert raw_paths(tmp_path, "2000334")[0].parent == tmp_path / "raw" / "FinalPositions"


def test_every_flag_has_help_and_overrides_are_in_the_usage():
    import argparse

    from kflow_mol.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        missing = [a.dest for a in p._actions if a.help is None]
        assert not missing, (name, missing)
        assert "--threads" in p.format_help()
        assert ("key=value" in p.format_usage()) == (name != "assemble"), name


def test_commands_shown_in_the_docs_parse(repo_dir):
    """Every `kflow-mol ...` line of the READMEs is accepted by the parser (flags and key=value overrides)."""
    import shlex

    from kflow_mol.cli import build_parser

    lines = [line.split("#")[0].strip() for f in ("README.md", "datasets/README.md")
             for line in (repo_dir / f).read_text().splitlines() if line.strip().startswith("kflow-mol ")
             and "[" not in line]  # synopsis lines ([--steps N]) are not commands
    assert len(lines) > 5
    for line in lines:
        argv = shlex.split(line)[1:]
        args, extra = build_parser().parse_known_args(argv)  # argparse exits 2 on a bad line
        assert all("=" in e for e in extra), line


def test_inspect_and_assemble_draw_the_same_loose_state(trained, small, tmp_path, capsys):
    cif = sorted(small.glob("*.cif"))[1]
    assert main(["inspect", str(cif), "--png", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.rfind("{\n"):])
    assert main(["assemble", str(cif), "--out", str(tmp_path / "a"), "--ckpt", str(trained / "model.pt"),
                 "--steps", "1"]) == 0
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["floors"]["do_nothing"]["pm_atom"] == pytest.approx(info["do_nothing_pm_atom"], rel=1e-12)


def test_assemble_refine_writes_refined_cif_and_metrics(tmp_path, capsys):
    """`assemble <cif> --refine --steps 2` with the shipped model: refined.cif beside assembled.cif, a "refined"
    block in metrics.json, and the sampling time beside the total time."""
    cif = mini_dir() / "cifs" / "2000334.cif"
    out = tmp_path / "r"
    capsys.readouterr()
    assert main(["assemble", str(cif), "--refine", "--steps", "2", "--out", str(out)]) == 0
    for name in ("assembled.cif", "refined.cif", "refined.extxyz", "metrics.json"):
        assert (out / name).exists(), name
    m = json.loads((out / "metrics.json").read_text())
    assert {"clashes", "model"} <= set(m["refined"]) and "pm_atom" in m["refined"]["model"]
    assert "refined" in (out / "refined.cif").read_text().splitlines()[3]
    assert m["steps"] == 2 and 0 < m["seconds"] <= m["seconds_total"] and m["seconds_read_input"] >= 0
    cap = capsys.readouterr().out
    assert "refined (reported separately)" in cap and "time: sampling " in cap and "total " in cap


def test_build_dataset_limit_flags(small, tmp_path, capsys):
    """The pre-expansion caps are flags: a cell volume cap below every crystal rejects them all as too_large,
    each with its reason, and the summary states the limits in force."""
    out = tmp_path / "d"
    assert main(["build-dataset", "--cif-dir", str(small), "--out", str(out), "--workers", "1",
                 "--max-cell-volume", "10", "--timeout", "30", "--max-memory-gb", "2", "--no-noise"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accepted"] == 0 and summary["reasons"] == {"too_large": summary["n_files"]}
    assert summary["limits"]["max_cell_volume"] == 10 and summary["limits"]["timeout_s"] == 30
    rows = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert all("max_cell_volume 10" in r["message"] for r in rows)
