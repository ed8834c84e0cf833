"""MNIST benchmark of the image K-Flow models, scored by the in-repo MNIST classifier.

    python benchmarks/image_mnist.py classifier              # (re)make kflow_image/weights/mnist_classifier.pt
    python benchmarks/image_mnist.py score RUN [RUN ...] [--steps 50] [--source estimate|fixed]
                                            [--cfg-scale S] [--cfg-interval LO HI] [--no-ema] [--n-per-class 100]
                                            [--json FILE] [--grid PNG]
    python benchmarks/image_mnist.py diagnose RUN [RUN ...]   # predictions on the true path, by k
    python benchmarks/image_mnist.py table FILE.json          # markdown rows

``classifier`` trains :class:`kflow_image.metrics.MNISTClassifier` on images ``[0, 9000)`` of the shipped MNIST
test set (the generator's training split) and reports its accuracy on the held-out ``[9000, 10000)``.

``score`` samples ``n-per-class`` digits of every class from each run (``kflow-image train`` run folders) and
reports the conditional accuracy (fraction classified as the requested class) and the Fréchet distance on the
classifier's 64-d features against the 1000 held-out digits, both with 95 % bootstrap intervals, beside the
real-vs-real floor (1000 training digits vs the held-out ones). Use one torch thread on a shared machine
(``--threads 1``).
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


def mnist_split():
    from kflow_image.data import MNISTDataset
    from kflow_image.metrics import MNIST_CLASSIFIER_SPLIT

    ds = MNISTDataset(None, "test", resolution=32, channels=1)
    x = ds._images.float() / 255.0
    s = MNIST_CLASSIFIER_SPLIT
    return (x[:s], ds.labels[:s]), (x[s:], ds.labels[s:])


def cmd_classifier(args) -> dict:
    from kflow_image.metrics import (
        MNIST_CLASSIFIER_FILE,
        conditional_accuracy,
        load_mnist_classifier,
        save_mnist_classifier,
        train_mnist_classifier,
    )

    (xt, yt), (xh, yh) = mnist_split()
    t0 = time.perf_counter()
    model = train_mnist_classifier(xt, yt, epochs=args.epochs, seed=args.seed,
                                   log=lambda s: print(s, file=sys.stderr, flush=True))
    train_s = time.perf_counter() - t0
    pred, _ = model.predict(xh)
    acc = conditional_accuracy(pred, yh.numpy())
    pred_t, _ = model.predict(xt)
    info = {"trained_on": "shipped MNIST test set, images [0, 9000)", "heldout": "images [9000, 10000)",
            "heldout_acc": acc["acc"], "heldout_acc_ci95": [acc["lo"], acc["hi"]],
            "train_acc": float((pred_t == yt.numpy()).mean()), "epochs": args.epochs, "seed": args.seed,
            "train_s": round(train_s, 1), "torch": str(torch.__version__), "threads": torch.get_num_threads(),
            "command": f"python benchmarks/image_mnist.py classifier --epochs {args.epochs} --seed {args.seed}"}
    out = Path(args.out) if args.out else MNIST_CLASSIFIER_FILE
    save_mnist_classifier(model, out, info)
    load_mnist_classifier(out)  # round trip
    info["file"] = str(out)
    info["bytes"] = out.stat().st_size
    print(json.dumps(info, indent=2))
    return info


@torch.no_grad()
def score_run(run_dir: str, clf, real_held, n_per_class: int = 100, steps: int | None = None,
              source: str | None = None, cfg_scale: float | None = None, ema: bool = True, seed: int = 1,
              method: str | None = None, save_grid_to: str | None = None, grid: str | None = None,
              cfg_interval: list[float] | None = None) -> dict:
    """Sample ``n_per_class`` digits per class from a run and score them (see the module doc); ``steps``,
    ``source``, ``method`` and ``grid`` override the run's solver, ``cfg_scale`` and ``cfg_interval`` (``[]``:
    everywhere) its guidance."""
    import dataclasses

    from kflow.train import load_model_weights
    from kflow_image.metrics import mnist_scores
    from kflow_image.pipeline import generate, load_run
    from kflow_image.sampling import save_labelled_grid

    run = load_run(run_dir, "cpu")
    if not ema:
        load_model_weights(run.model, run.path, use_ema=False)
        run.model.eval()
    solver = run.solver.replace(steps=steps, source=source, method=method, grid=grid)
    if cfg_scale is None:
        cfg_scale = run.sampling.cfg_scale
    if cfg_interval is not None:
        run.sampling = dataclasses.replace(run.sampling, cfg_interval=tuple(cfg_interval) if cfg_interval else None)
    ncls = run.num_classes
    y = torch.arange(ncls).repeat_interleave(n_per_class)
    t0 = time.perf_counter()
    imgs = generate(run, y, len(y), seed, batch_size=250, cfg_scale=cfg_scale, solver=solver)
    gen_s = time.perf_counter() - t0
    sc = mnist_scores(clf, imgs, y, real_held)
    if save_grid_to:
        per = min(8, n_per_class)
        sel = torch.cat([torch.arange(c * n_per_class, c * n_per_class + per) for c in range(ncls)])
        save_labelled_grid(imgs[sel], y[sel], save_grid_to, per_row=per)
    cfg, mc = run.cfg, run.model.config
    return {"run": str(run_dir), "step": run.step, "transform": cfg["transform"]["_target_"].rsplit(".", 1)[-1],
            "window": cfg["schedule"].get("window"), "patch": mc.patch_size, "hidden": mc.hidden_size,
            "depth": mc.depth, "params_M": round(sum(p.numel() for p in run.model.parameters()) / 1e6, 3),
            "sampler": {"steps": solver.steps, "source": solver.source, "method": solver.method,
                        "grid": solver.grid, "cfg_scale": cfg_scale, "cfg_interval": run.sampling.cfg_interval,
                        "ema": ema, "seed": seed},
            "n": len(y), "sample_s": round(gen_s, 1), **sc}


def real_floor(clf, real_train, y_train, real_held, y_held) -> dict:
    from kflow_image.metrics import conditional_accuracy, frechet_with_ci

    pred, feats_h = clf.predict(real_held)
    _, feats_t = clf.predict(real_train)
    return {"heldout_acc": conditional_accuracy(pred, y_held.numpy()),
            "fd_train_vs_heldout": frechet_with_ci(feats_t, feats_h)}


def cmd_score(args) -> list[dict]:
    from kflow_image.metrics import load_mnist_classifier

    clf = load_mnist_classifier(args.classifier)
    (xt, yt), (xh, yh) = mnist_split()
    floor = real_floor(clf, xt[:1000], yt[:1000], xh, yh)
    print(json.dumps({"real_floor": {"acc": floor["heldout_acc"]["acc"], "fd": floor["fd_train_vs_heldout"]}}),
          flush=True)
    out = []
    for rd in args.runs:
        for s in args.steps:
            r = score_run(rd, clf, xh, args.n_per_class, s, args.source, args.cfg_scale, not args.no_ema,
                          args.seed, args.method, args.grid, args.grid_kind, args.cfg_interval)
            r["real_floor"] = floor
            out.append(r)
            a, f = r["cond_acc"], r["fd"]
            print(json.dumps({"run": rd, "sampler": r["sampler"], "acc": round(a["acc"], 4),
                              "acc_classifier_only": round(r["cond_acc_classifier_only"]["acc"], 4),
                              "blank": round(r["blank"]["fraction"], 4),
                              "acc_ci": [round(a["lo"], 4), round(a["hi"], 4)], "fd": round(f["fd"], 2),
                              "fd_ci": [round(f["lo"], 2), round(f["hi"], 2)], "sample_s": r["sample_s"]}),
                  flush=True)
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.is_file() else []
        meta = {"machine": f"{platform.system()} {platform.machine()}, torch {torch.__version__}, "
                           f"{torch.get_num_threads()} thread(s)", "date": time.strftime("%Y-%m-%d %H:%M")}
        path.write_text(json.dumps(old + [{**r, **meta} for r in out], indent=1))
    return out


@torch.no_grad()
def cmd_diagnose(args) -> None:
    """Endpoint predictions on the *true* path of held-out digits, by k: is the model or the sampler at fault?

    For each k: the classifier's accuracy on the decoded prediction x1_hat(x_k, k, y) and on x_k itself, and the
    endpoint MSE; ``--grid`` writes rows x_k / x1_hat for 8 digits at every k.
    """
    from kflow_image.metrics import load_mnist_classifier
    from kflow_image.pipeline import load_run
    from kflow_image.sampling import save_grid

    clf = load_mnist_classifier(args.classifier)
    _, (xh, yh) = mnist_split()
    x, y = xh[:args.n], yh[:args.n]
    for rd in args.runs:
        run = load_run(rd, "cpu")
        task, model, codec = run.task, run.model, run.codec
        x1 = codec.encode(x)
        x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(0))
        rows = []
        for k in args.k:
            ps = task.path.sample(x0, x1, torch.full((len(x1),), k))
            pred = model(ps.x_k, ps.k, y=y)
            img = codec.decode(pred)
            acc_hat = float((clf.predict(img)[0] == y.numpy()).mean())
            acc_k = float((clf.predict(codec.decode(ps.x_k))[0] == y.numpy()).mean())
            print(json.dumps({"run": rd, "k": k, "mse_endpoint": round(float((pred - x1).pow(2).mean()), 5),
                              "acc_x1_hat": acc_hat, "acc_x_k": acc_k}), flush=True)
            rows += [codec.decode(ps.x_k[:8]), img[:8]]
        if args.grid:
            save_grid(torch.cat(rows), Path(args.grid) / f"diagnose_{Path(rd).name}.png", nrow=8, scale=2)


def cmd_table(args) -> None:
    """Markdown rows of a scores JSON (one per scored run x sampler setting)."""
    rows = json.loads(Path(args.json).read_text())
    print("| run | transform, w | sampler | n | cond. acc. [95 % CI] | FD [95 % CI] | sample s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        s, a, f = r["sampler"], r["cond_acc"], r["fd"]
        iv = s.get("cfg_interval")
        source = s.get("source", s.get("x0_mode"))  # results written before solver.source: x0_mode
        samp = (f"{s['method']}, {s['steps']} {s.get('grid', 'uniform')} steps, x0 {source}, "
                f"cfg {s['cfg_scale']}" + (f" on k in [{iv[0]}, {iv[1]})" if iv else "")) + ("" if s["ema"] else ", no EMA")
        print(f"| {Path(r['run']).name} | {r['transform'].replace('Transform', '').lower()}, {r['window']} | {samp} | "
              f"{r['n']} | {100 * a['acc']:.1f} [{100 * a['lo']:.1f}, {100 * a['hi']:.1f}] | "
              f"{f['fd']:.0f} [{f['lo']:.0f}, {f['hi']:.0f}] | {r['sample_s']} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("classifier", help="train and ship the MNIST classifier")
    c.add_argument("--epochs", type=int, default=8)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", help="weights file (default: kflow_image/weights/mnist_classifier.pt)")
    s = sub.add_parser("score", help="conditional accuracy and classifier FD of runs")
    s.add_argument("runs", nargs="+")
    s.add_argument("--n-per-class", type=int, default=100)
    s.add_argument("--steps", type=int, nargs="+", default=[None])
    s.add_argument("--source", "--x0-mode", dest="source", choices=["estimate", "fixed"],
                   help="solver source (default: the run's solver.source)")
    s.add_argument("--method", choices=["exact", "euler", "heun"])
    s.add_argument("--grid-kind", choices=["uniform", "band"], help="k-grid of the sampler (default: the run's)")
    s.add_argument("--cfg-scale", type=float, help="guidance scale (default: the run's sample.cfg_scale)")
    s.add_argument("--cfg-interval", type=float, nargs="*",
                   help="K_LO K_HI: guide only there (no values: everywhere; default: the run's)")
    s.add_argument("--no-ema", action="store_true")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--classifier", help="classifier weights (default: the shipped ones)")
    s.add_argument("--grid", help="also save a labelled grid (8 per class) of the scored samples")
    s.add_argument("--json", help="append the results to this JSON list")
    d = sub.add_parser("diagnose", help="endpoint predictions on the true path of held-out digits, by k")
    d.add_argument("runs", nargs="+")
    d.add_argument("--n", type=int, default=200)
    d.add_argument("--k", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9, 0.97])
    d.add_argument("--classifier")
    d.add_argument("--grid", help="folder for the x_k / x1_hat picture")
    t = sub.add_parser("table", help="markdown table of a scores JSON")
    t.add_argument("json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    {"classifier": cmd_classifier, "score": cmd_score, "diagnose": cmd_diagnose, "table": cmd_table}[args.cmd](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
