"""``kflow-image``: train, sample and evaluate class-conditional K-Flow image models.

Sub-commands (``kflow-image <cmd> --help`` documents every flag)::

    kflow-image train    [--data mnist|tiny-imagenet|PATH] [--transform fourier|wavelet|pca|identity]
                         [--baseline] [--steps N] [--run-dir DIR] [--resume] [key=value ...]
    kflow-image sample   --ckpt RUN_DIR|FILE --out grid.png [--cfg-scale S] [--class-drop-at F]
                         [--split-bands KMIN[:KMAX]] [--restore data|IMAGE|FOLDER --degrade downsample|blur
                         [--restore-method bands|sdedit]]
    kflow-image evaluate --ckpt RUN_DIR|FILE [--n N] [--json]

Everything after the flags that looks like ``key=value`` is a hydra override of ``configs/image.yaml``
(``data=``, ``model=`` and ``trainer=`` pick files of ``configs/image/{data,model,trainer}``; e.g.
``transform=wavelet transform.wave=db2 schedule=hard trainer.steps=3000 model=dit_small``).
The default ``train`` is class-conditional MNIST (the shipped test set, 32x32 pixels, identity codec):
a few minutes on 2 CPU cores; it writes ``config.json``, ``metrics.jsonl``, ``loss.png``, ``last.pt`` and a
sample grid ``samples.png`` into the run directory.

This module only parses arguments: the work is done by :mod:`kflow_image.pipeline`.
"""
from __future__ import annotations

import argparse
import json
import time

from kflow.cli import InputError, check_overrides, compose, configs_dir, run_command, to_container

CLASS_GROUPS = ("data", "model", "trainer")
LEGACY_KEYS = {"sample.x0_mode": "solver.source"}  # overrides of runs written before solver.source


def _overrides(extra: list[str], groups: bool = True) -> list[tuple[str, str]]:
    """``(key, value)`` of ``key=value`` overrides; ``groups``: ``data=X``/``model=X``/``trainer=X`` pick
    the image groups. Anything else is refused."""
    check_overrides(extra)
    out = []
    for e in extra:
        key, _, val = e.partition("=")
        key = LEGACY_KEYS.get(key, key)
        out.append((f"image/{key}@{key}" if groups and key in CLASS_GROUPS else key, val))
    return out


def cmd_train(args, extra) -> int:
    from kflow_image import pipeline

    pre = []
    if args.data:
        known = (configs_dir() / "image" / "data" / f"{args.data}.yaml").exists()
        pre += [f"image/data@data={args.data}"] if known else ["image/data@data=folder", f"data.root={args.data}"]
    if args.baseline:
        pre += ["transform=identity", "schedule=flow"]
    elif args.transform:
        pre += [f"transform={args.transform}"]
    for flag, key in (("steps", "trainer.steps"), ("run_dir", "trainer.run_dir"), ("device", "trainer.device")):
        if getattr(args, flag):
            pre.append(f"{key}={getattr(args, flag)}")
    cfg = to_container(compose("image", pre + [f"{k}={v}" for k, v in _overrides(extra)]))
    _, summary = pipeline.train(cfg, resume=bool(args.resume))
    if summary:
        print(json.dumps(summary))
    return 0


def _parse_bands(spec: str) -> tuple[float, float]:
    try:
        parts = [float(v) for v in spec.split(":")]
    except ValueError:
        raise InputError(f"--split-bands takes KMIN or KMIN:KMAX (scales in [0, 1]), got {spec!r}") from None
    lo, hi = (parts[0], 1.0) if len(parts) == 1 else (parts[0], parts[1])
    if not 0 <= lo <= hi <= 1 or len(parts) > 2:
        raise InputError(f"--split-bands needs 0 <= KMIN <= KMAX <= 1, got {spec!r}")
    return lo, hi


def cmd_sample(args, extra) -> int:
    from kflow_image import pipeline

    run = pipeline.load_run(args.ckpt, args.device)
    if extra:
        run = run.with_overrides(_overrides(extra, groups=False))
    cfg_scale = run.sampling.cfg_scale if args.cfg_scale is None else args.cfg_scale
    solver = run.solver.replace(steps=args.steps)
    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    n = args.n or run.default_count(classes, grid=not (args.restore or args.split_bands or args.uncond))
    labels = None if args.uncond else pipeline.labels_for(n, run.num_classes, classes, run.device)
    t0 = time.perf_counter()
    if args.restore:
        info = pipeline.restore(run, args.restore, n, args.out, degradation=args.degrade, factor=args.factor,
                                sigma=args.sigma, kappa_max=args.restore_kappa, seed=args.seed, cfg_scale=cfg_scale,
                                uncond=args.uncond, solver=solver, method=args.restore_method,
                                k_start=args.k_start)
    elif args.split_bands:
        info = pipeline.split_bands(run, _parse_bands(args.split_bands), n, args.rows, args.out, labels=labels,
                                    seed=args.seed, cfg_scale=cfg_scale, class_drop_at=args.class_drop_at,
                                    solver=solver)
    else:
        info = pipeline.sample_grid(run, labels, n, args.out, seed=args.seed, nrow=args.nrow, npz=args.npz,
                                    cfg_scale=cfg_scale, class_drop_at=args.class_drop_at, solver=solver)
    print(json.dumps({"out": str(args.out), **info, "seconds": round(time.perf_counter() - t0, 2)}))
    return 0


def cmd_evaluate(args, extra) -> int:
    from kflow_image import pipeline

    run = pipeline.load_run(args.ckpt, args.device)
    res = pipeline.evaluate(run, args.n, args.seed, args.cfg_scale, args.class_drop_at,
                            run.solver.replace(steps=args.steps))
    pipeline.report_evaluation(res, as_json=args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kflow-image", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Trailing key=value pairs are hydra overrides of configs/image.yaml "
               "(e.g. transform=wavelet schedule=hard trainer.steps=3000 model=dit_small).")
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch default; 1 is faster for tiny models on a busy machine)")
    t = sub.add_parser("train", parents=[common], help="train a class-conditional K-Flow DiT (default: MNIST on CPU)",
                       epilog="Examples: kflow-image train;  kflow-image train --baseline;  "
                              "kflow-image train --data tiny-imagenet model=dit_small trainer.steps=20000")
    t.add_argument("--data", help="mnist (default), tiny-imagenet, or a folder root/<class>/<images>")
    t.add_argument("--transform", choices=["fourier", "wavelet", "pca", "identity"],
                   help="K-amplitude transform (default: fourier)")
    t.add_argument("--baseline", action="store_true",
                   help="the w = 1 rectified-flow (LFM) baseline: transform=identity schedule=flow")
    t.add_argument("--steps", type=int, help="optimizer steps (trainer.steps)")
    t.add_argument("--run-dir", help="output folder (trainer.run_dir; default runs/image)")
    t.add_argument("--device", help="auto | cpu | cuda | cuda:N (trainer.device)")
    t.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt (exact resume)")
    s = sub.add_parser("sample", parents=[common], help="sample an image grid (guidance, class drop, noise split, restoration)")
    s.add_argument("--ckpt", required=True, help="run folder or checkpoint file (EMA weights are used)")
    s.add_argument("--out", required=True, help="output PNG grid")
    s.add_argument("--n", type=int, help="number of samples (default: 8 per class; 32 for --uncond, --restore, --split-bands)")
    s.add_argument("--npz", metavar="FILE",
                   help="also write the raw samples: images (N, C, H, W) float32 in [0, 1] and labels (N,)")
    s.add_argument("--classes", help="comma-separated labels, cycled over the samples (default: all classes)")
    s.add_argument("--uncond", action="store_true", help="unconditional samples (null class)")
    s.add_argument("--split-bands", metavar="KMIN[:KMAX]",
                   help="noise splitting: share the noise of scales in [KMIN, KMAX] within each row")
    s.add_argument("--rows", type=int, default=4, help="rows of the noise-splitting grid (default 4)")
    s.add_argument("--restore", metavar="data|IMAGE|FOLDER",
                   help="training-free restoration of degraded images ('data': held-out images of the run's data)")
    s.add_argument("--degrade", choices=["downsample", "blur"], default="downsample",
                   help="degradation applied to --restore inputs (super-resolution or deblurring)")
    s.add_argument("--factor", type=int, default=4, help="downsampling factor (default 4)")
    s.add_argument("--sigma", type=float, default=2.0, help="blur std in pixels (default 2)")
    s.add_argument("--restore-kappa", type=float, default=0.25,
                   help="coefficients with scale <= this are taken from the observation (default 0.25)")
    s.add_argument("--restore-method", choices=["bands", "sdedit"], default="bands",
                   help="bands: pin the coarse bands to the observation (Fourier bands for an identity run); "
                        "sdedit: start from the observation on the path at --k-start")
    s.add_argument("--k-start", type=float, default=0.5, help="--restore-method sdedit: where the observation "
                   "enters the path (default 0.5)")
    s.add_argument("--nrow", type=int, help="images per grid row")
    e = sub.add_parser("evaluate", parents=[common], help="FID/KID/precision/recall beside real-vs-real and the codec floor")
    e.add_argument("--ckpt", required=True, help="run folder or checkpoint file")
    e.add_argument("--n", type=int, help="sample size (default: the run's evaluate.n)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    for q in (s, e):  # the sampler flags: the same meaning under both commands
        q.add_argument("--cfg-scale", type=float,
                       help="classifier-free guidance scale (1 = none; default: the run's sample.cfg_scale)")
        q.add_argument("--class-drop-at", type=float,
                       help="keep the label only for k < this fraction, null class after (paper: 0.3)")
        q.add_argument("--steps", type=int, help="sampler steps (default: the run's solver.steps)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)}")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    cmd = {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate}[args.cmd]
    # exit codes: 0 ok, 2 bad input (one `error:` line naming the file and the reason), 1 internal failure
    return run_command(cmd, args, extra, bad_input=(ValueError,))


if __name__ == "__main__":
    raise SystemExit(main())
