"""Steerability on MNIST (issue 15, item 4): K-Flow against the ``w = 1`` baseline, same network, same tricks.

    python benchmarks/image_steer.py --threads 1 restore   NAME=RUN [NAME=RUN ...] [--n 200] [--kappa 0.15 0.3]
                                                            [--k-start 0.3 0.6] [--degrade downsample blur]
    python benchmarks/image_steer.py --threads 1 classdrop NAME=RUN [...] [--n-per-class 30] [--drop 0.3 0.6]
    python benchmarks/image_steer.py --threads 1 split     NAME=RUN [...] [--groups 12] [--per-group 8]
    python benchmarks/image_steer.py table                 # markdown tables of the JSON files

Runs are ``kflow-image train`` folders (``kflow-image train`` and ``kflow-image train --baseline``). Everything
goes through :mod:`kflow_image.pipeline`; results land in ``benchmarks/results/image_steer/`` (JSON + PNG).

* ``restore``: the first ``n`` held-out digits (``[9000, 9000 + n)``, never trained on) are degraded
  (``downsample``: 4x box average, bicubic back up; ``blur``: Gaussian, std 2 px) and restored without training
  and without their label (null class), by ``bands`` (the coarse bands ``kappa <= K`` pinned to the path through
  the observation after every step; the baseline has no bands, so Fourier bands of its straight path are pinned,
  ILVR-style) and by ``sdedit`` (the observation enters the path at ``k_start``, then the sampler runs to 1).
  Scores: PSNR and SSIM against the truth, and the MNIST classifier's accuracy on the restored digits (their true
  labels), each with a 95 % bootstrap interval over digits; the observation itself is the do-nothing row.
* ``classdrop``: ``n-per-class`` digits per class with the label throughout, and with the label only for
  ``k < drop`` (null class afterwards), same noise, no guidance. Reported: the conditional accuracy of each and
  the class-drop ratio CDR = mean_c FD_c(drop) / FD_c(full) on the classifier's features against the held-out
  digits of class c (:func:`kflow_image.metrics.class_drop_ratio_ci`, 95 % bootstrap interval).
* ``split``: unconditional samples in groups whose source noise shares the Fourier bands ``kappa <= 0.25``
  (``coarse``) or ``kappa > 0.25`` (``fine``) and is independent elsewhere
  (:func:`kflow_image.sampling.split_noise`; the same noise for both models). Measured, within a group against
  across groups: how often two samples get the same classifier label, and the correlation of their coarse
  (``kappa <= 0.25``) and fine (``kappa > 0.25``) Fourier components; intervals by resampling groups.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "image_steer"
sys.path.insert(0, str(REPO / "benchmarks"))


def _runs(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for s in specs:
        name, _, path = s.partition("=")
        if not path:
            raise SystemExit(f"give runs as NAME=RUN_DIR, got {s!r}")
        out.append((name, path))
    return out


def _meta(args, cmd: str) -> dict:
    return {"command": "python benchmarks/image_steer.py " + " ".join(sys.argv[1:]), "subcommand": cmd,
            "machine": f"{platform.system()} {platform.machine()}, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} thread(s)", "date": time.strftime("%Y-%m-%d %H:%M")}


def _mean_ci(v: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    from kflow_image.metrics import bootstrap_ci

    v = np.asarray(v, np.float64)
    lo, hi = bootstrap_ci(lambda i: v[i].mean(), len(v), n_boot, seed=seed)
    return {"mean": float(v.mean()), "lo": lo, "hi": hi}


def _held(n: int, offset: int = 0):
    from image_mnist import mnist_split

    _, (xh, yh) = mnist_split()
    return xh[offset:offset + n], yh[offset:offset + n], xh, yh


def _load(path: str):
    from kflow_image.pipeline import load_run

    return load_run(path, "cpu")


# ---------------------------------------------------------------------------------------------- restore
def _restore_scores(clf, img, clean, y) -> dict:
    from kflow_image.metrics import conditional_accuracy, psnr, ssim

    pred, _ = clf.predict(img)
    acc = conditional_accuracy(pred, y.numpy())
    return {"psnr": _mean_ci(psnr(img, clean).numpy()), "ssim": _mean_ci(ssim(img, clean).numpy()),
            "acc": {"mean": acc["acc"], "lo": acc["lo"], "hi": acc["hi"]}}


def cmd_restore(args) -> None:
    from kflow_image.metrics import load_mnist_classifier
    from kflow_image.pipeline import restore_images
    from kflow_image.sampling import degrade, save_grid

    clf = load_mnist_classifier()
    OUT.mkdir(parents=True, exist_ok=True)
    clean, y, _, _ = _held(args.n)
    runs = [(name, _load(p)) for name, p in _runs(args.runs)]
    rows = []
    for kind in args.degrade:
        obs = degrade(clean, kind, factor=4, sigma=2.0)
        rows.append({"degradation": kind, "model": "-", "method": "observation", "param": None,
                     **_restore_scores(clf, obs, clean, y)})
        print(json.dumps(rows[-1]), flush=True)
        show = [clean[:args.show], obs[:args.show]]
        labels = ["truth", f"observation ({kind})"]
        for name, run in runs:
            settings = [("bands", k) for k in args.kappa] + [("sdedit", k) for k in args.k_start]
            for method, par in settings:
                t0 = time.perf_counter()
                img = restore_images(run, obs, None, method, kappa_max=par, k_start=par, seed=args.seed)
                r = {"degradation": kind, "model": name, "run": str(run.path), "method": method, "param": par,
                     "seconds": round(time.perf_counter() - t0, 1), **_restore_scores(clf, img, clean, y)}
                rows.append(r)
                print(json.dumps(r), flush=True)
                show.append(img[:args.show])
                labels.append(f"{name} {method} {'kappa<=' if method == 'bands' else 'k_start='}{par}")
        png = OUT / f"restore{args.tag}_{kind}.png"
        save_grid(torch.cat(show), png, nrow=args.show, scale=2)
        (OUT / f"restore{args.tag}_{kind}_rows.txt").write_text("\n".join(labels) + "\n")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"restore{args.tag}.json").write_text(json.dumps({**_meta(args, "restore"), "n": args.n,
                                                  "digits": f"held-out [9000, {9000 + args.n})",
                                                  "rows": rows}, indent=1))


# ---------------------------------------------------------------------------------------------- class drop
def cmd_classdrop(args) -> None:
    from kflow_image.metrics import class_drop_ratio_ci, conditional_accuracy, load_mnist_classifier
    from kflow_image.pipeline import generate
    from kflow_image.sampling import save_grid

    clf = load_mnist_classifier()
    _, _, xh, yh = _held(0)
    _, real_feats = clf.predict(xh)
    y = torch.arange(10).repeat_interleave(args.n_per_class)
    rows, show = [], []
    for name, path in _runs(args.runs):
        run = _load(path)
        t0 = time.perf_counter()
        full = generate(run, y, len(y), args.seed, batch_size=150, cfg_scale=1.0)
        pf, ff = clf.predict(full)
        acc = conditional_accuracy(pf, y.numpy())
        rows.append({"model": name, "run": path, "drop": None, "acc": {"mean": acc["acc"], "lo": acc["lo"],
                                                                         "hi": acc["hi"]},
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
        pick = torch.arange(10) * args.n_per_class  # one digit per class, the same noise in every row
        show.append(full[pick])
        for d in args.drop:
            t0 = time.perf_counter()
            img = generate(run, y, len(y), args.seed, batch_size=150, cfg_scale=1.0, class_drop_at=d)
            pd, fd = clf.predict(img)
            acc = conditional_accuracy(pd, y.numpy())
            c = class_drop_ratio_ci(ff, y.numpy(), fd, y.numpy(), real_feats, yh.numpy(), n_boot=args.n_boot)
            rows.append({"model": name, "run": path, "drop": d,
                         "acc": {"mean": acc["acc"], "lo": acc["lo"], "hi": acc["hi"]},
                         "per_class_acc": acc["per_class"],
                         "cdr": {"mean": c["cdr"], "lo": c["lo"], "hi": c["hi"]},
                         "cdr_per_class": c["per_class"], "fd_full": c["fd_full"], "fd_drop": c["fd_drop"],
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("fd_full", "fd_drop")}), flush=True)
            show.append(img[pick])
    OUT.mkdir(parents=True, exist_ok=True)
    save_grid(torch.cat(show), OUT / "classdrop.png", nrow=10, scale=2)
    (OUT / "classdrop_rows.txt").write_text("\n".join(f"{n} {'label throughout' if d is None else f'label for k < {d}'}"
                                                      for n, _ in _runs(args.runs) for d in [None, *args.drop]) + "\n")
    (OUT / "classdrop.json").write_text(json.dumps({**_meta(args, "classdrop"), "n_per_class": args.n_per_class,
                                                    "guidance": "none", "rows": rows}, indent=1))


# ---------------------------------------------------------------------------------------------- split
def _pair_stats(groups: int, per: int, same_fn) -> tuple[np.ndarray, np.ndarray]:
    """Per group: the mean of ``same_fn(i, j)`` over pairs within the group, and over pairs of its members with
    the members of the next group (across)."""
    within, across = [], []
    for g in range(groups):
        idx = range(g * per, (g + 1) * per)
        nxt = range(((g + 1) % groups) * per, ((g + 1) % groups + 1) * per)
        within.append(np.mean([same_fn(i, j) for i in idx for j in idx if i < j]))
        across.append(np.mean([same_fn(i, j) for i in idx for j in nxt]))
    return np.array(within), np.array(across)


def cmd_split(args) -> None:
    from kflow.transforms import FourierTransform
    from kflow_image.metrics import load_mnist_classifier
    from kflow_image.sampling import restoration_bands, save_grid, split_noise
    from kflow_image.task import band_mask

    clf = load_mnist_classifier()
    rows, show = [], []
    cut = args.cut
    for name, path in _runs(args.runs):
        run = _load(path)
        band_t = restoration_bands(run.task, run.event_shape)
        f = FourierTransform(run.event_shape)
        coarse = band_mask(f, 0.0, cut).bool()[0, 0]
        for shared, (lo, hi) in (("coarse", (0.0, cut)), ("fine", (cut + 1e-6, 1.0)), ("none", (None, None))):
            g = torch.Generator().manual_seed(args.seed)
            imgs = []
            t0 = time.perf_counter()
            for _ in range(args.groups):
                if lo is None:
                    x_0 = torch.randn((args.per_group, *run.event_shape), generator=g)
                else:
                    x_0, _ = split_noise(band_t, args.per_group, run.event_shape, lo, hi, generator=g)
                sol = run.task.sample(run.model, None, run.solver, x_0=x_0)
                imgs.append(run.codec.decode(sol.x_1).cpu())
            img = torch.cat(imgs)
            pred, _ = clf.predict(img)
            c = f(img - img.mean(dim=(-2, -1), keepdim=True))[:, 0]  # per-image Fourier coefficients, no DC
            cc, cf = c[:, coarse].numpy(), c[:, ~coarse].numpy()

            def corr(a):
                a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
                return lambda i, j: float(a[i] @ a[j])

            stats = {}
            for key, fn in (("same_class", lambda i, j: float(pred[i] == pred[j])), ("corr_coarse", corr(cc)),
                            ("corr_fine", corr(cf))):
                w, a = _pair_stats(args.groups, args.per_group, fn)
                stats[key] = {"within": _mean_ci(w), "across": _mean_ci(a)}
            r = {"model": name, "run": path, "shared": shared,
                 "bands": None if lo is None else [round(lo, 4), hi], "groups": args.groups,
                 "per_group": args.per_group, "seconds": round(time.perf_counter() - t0, 1),
                 "classes": np.bincount(pred, minlength=10).tolist(), **stats}
            rows.append(r)
            print(json.dumps(r), flush=True)
            if lo is not None:
                show.append(img[:args.show_groups * args.per_group])
    OUT.mkdir(parents=True, exist_ok=True)
    save_grid(torch.cat(show), OUT / "split.png", nrow=args.per_group, scale=2)
    (OUT / "split_rows.txt").write_text("\n".join(
        f"{n} shared {s}: {args.show_groups} rows (one group each)" for n, _ in _runs(args.runs)
        for s in ("coarse", "fine")) + "\n")
    (OUT / "split.json").write_text(json.dumps({**_meta(args, "split"), "cut": cut, "unconditional": True,
                                                "rows": rows}, indent=1))


# ---------------------------------------------------------------------------------------------- table
def _ci(d, fmt="{:.1f}", scale=1.0) -> str:
    return f"{fmt.format(scale * d['mean'])} [{fmt.format(scale * d['lo'])}, {fmt.format(scale * d['hi'])}]"


def cmd_table(args) -> None:
    rows = [r for p in sorted(OUT.glob("restore*.json")) for r in json.loads(p.read_text())["rows"]]
    if rows:
        print("| degradation | model | method | PSNR dB | SSIM | classifier acc. % |\n|---|---|---|---|---|---|")
        seen = set()
        for r in sorted(rows, key=lambda r: (r["degradation"], r["model"] != "-", r["model"], r["method"],
                                             r["param"] or 0)):
            key = (r["degradation"], r["model"], r["method"], r["param"])
            if key in seen:  # the observation row of every file
                continue
            seen.add(key)
            par = "" if r["param"] is None else (f" κ ≤ {r['param']}" if r["method"] == "bands"
                                                 else f" from k = {r['param']}")
            print(f"| {r['degradation']} | {r['model']} | {r['method']}{par} | {_ci(r['psnr'], '{:.2f}')} | "
                  f"{_ci(r['ssim'], '{:.3f}')} | {_ci(r['acc'], scale=100)} |")
    p = OUT / "classdrop.json"
    if p.is_file():
        print("\n| model | label | cond. acc. % | CDR |\n|---|---|---|---|")
        for r in json.loads(p.read_text())["rows"]:
            lab = "throughout" if r["drop"] is None else f"k < {r['drop']}"
            cdr = "–" if r["drop"] is None else _ci(r["cdr"], "{:.2f}")
            print(f"| {r['model']} | {lab} | {_ci(r['acc'], scale=100)} | {cdr} |")
    p = OUT / "split.json"
    if p.is_file():
        print("\n| model | shared noise | same class, within / across % | coarse corr. within / across | "
              "fine corr. within / across |\n|---|---|---|---|---|")
        for r in json.loads(p.read_text())["rows"]:
            s = r["same_class"]
            print(f"| {r['model']} | {r['shared']} | {_ci(s['within'], scale=100)} / {_ci(s['across'], scale=100)} | "
                  f"{_ci(r['corr_coarse']['within'], '{:.2f}')} / {_ci(r['corr_coarse']['across'], '{:.2f}')} | "
                  f"{_ci(r['corr_fine']['within'], '{:.2f}')} / {_ci(r['corr_fine']['across'], '{:.2f}')} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="results folder (default benchmarks/results/image_steer)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("restore")
    r.add_argument("runs", nargs="+")
    r.add_argument("--n", type=int, default=200)
    r.add_argument("--degrade", nargs="+", default=["downsample", "blur"], choices=["downsample", "blur"])
    r.add_argument("--kappa", type=float, nargs="*", default=[0.15, 0.3])
    r.add_argument("--k-start", type=float, nargs="*", default=[0.3, 0.6])
    r.add_argument("--show", type=int, default=12)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--tag", default="", help="suffix of the output files (restore{TAG}.json, ...)")
    c = sub.add_parser("classdrop")
    c.add_argument("runs", nargs="+")
    c.add_argument("--n-per-class", type=int, default=30)
    c.add_argument("--drop", type=float, nargs="+", default=[0.3, 0.6])
    c.add_argument("--n-boot", type=int, default=200)
    c.add_argument("--seed", type=int, default=1)
    s = sub.add_parser("split")
    s.add_argument("runs", nargs="+")
    s.add_argument("--groups", type=int, default=12)
    s.add_argument("--per-group", type=int, default=8)
    s.add_argument("--cut", type=float, default=0.25)
    s.add_argument("--show-groups", type=int, default=4)
    s.add_argument("--seed", type=int, default=1)
    sub.add_parser("table")
    args = p.parse_args(argv)
    global OUT
    if args.out:
        OUT = Path(args.out)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    {"restore": cmd_restore, "classdrop": cmd_classdrop, "split": cmd_split, "table": cmd_table}[args.cmd](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
