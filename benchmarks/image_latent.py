"""Image benchmark: class-conditional K-Flow vs the w = 1 rectified-flow baseline in TAEF2 latent space.

Data: Tiny-ImageNet, 10 classes, 64x64 (``$KFLOW_SHARED/data/images/tiny-imagenet-64-10class.tar``; 500 train
and 50 val images per class) encoded once with TAEF2 into 32x8x8 latents (standardised per channel with
training-set statistics). Every method uses the same DiT, optimizer, number of steps, batch, seed and sampler;
only the transform/schedule differ:

* ``fourier``  -- K-Flow, radial frequency of the latent's 2-D spectrum, window ``--window``;
* ``wavelet``  -- K-Flow, haar DWT (3 levels on 8x8);
* ``pca``      -- K-Flow, PCA basis fitted on the training latents;
* ``baseline`` -- identity transform, window 1: plain rectified flow (LFM-style).

Reported (generated images vs ``n`` real val images): FID, KID, k-NN precision/recall, beside the
real-vs-real value (``n`` train images vs the same val images) and the codec floor (TAEF2 reconstructions
of those train images); class-drop ratio CDR (per-class FID with the label for only the first 30% of k,
divided by per-class FID with the label throughout; closer to 1 = the late part of the path ignores the
class); wall-clock of training and sampling, images/s.

Writes ``benchmarks/results/image_latent.json`` and the section between ``<!-- image_latent:start -->`` and
``<!-- image_latent:end -->`` of ``BENCHMARKS.md``. The default fits about an hour on 2 CPU cores;
``--quick`` is a few-minute smoke configuration; raise ``--train-steps``/``--n-eval`` for real numbers.

    python benchmarks/image_latent.py [--shared ../shared] [--quick] [--train-steps 1500] [--n-eval 250]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kflow.schedule import BandSchedule
from kflow.solver import SolverConfig
from kflow.train import TrainConfig
from kflow.utils import atomic_write_text, shared_dir
from kflow_image.dit import DiT
from kflow_image.metrics import InceptionFeatures, class_drop_ratio, fid_exact
from kflow_image.pipeline import (
    TINY_IMAGENET_TAR,
    ImageRun,
    fit,
    generate,
    load_image_data,
    make_codec,
    metric_block,
    standardized_latents,
)
from kflow_image.sampling import save_grid
from kflow_image.task import make_task

START, END = "<!-- image_latent:start -->", "<!-- image_latent:end -->"
METHODS = {
    "baseline": dict(transform="identity", window=1.0),
    "fourier": dict(transform="fourier"),
    "wavelet": dict(transform="wavelet", wave="haar"),
    "pca": dict(transform="pca"),
}


def balanced_indices(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < per_class:
            raise SystemExit(f"class {c} has only {len(idx)} images, need {per_class}")
        out.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(out)


def class_fid(f_real, y_real, f_gen, y_gen) -> dict[int, float]:
    """Per-class FID (paper eq. 18) with :func:`fid_exact`."""
    return {int(c): fid_exact(f_real[y_real == c], f_gen[y_gen == c]) for c in np.unique(y_real)}


def metrics_block(f_real, f):
    return metric_block(f_real, f, knn=3, kid_subset=min(100, len(f)), exact=True)


def fmt_table(res: dict) -> str:
    n = res["settings"]["n_eval"]
    lines = ["| method | FID ↓ | KID ↓ | precision ↑ | recall ↑ | CDR (→1) | train s | sample img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ("real_vs_real", "codec_reconstruction"):
        b = res[name]
        lines.append(f"| *{name.replace('_', '-')}* | {b['fid']:.2f} | {b['kid']:.4f} | {b['precision']:.3f} "
                     f"| {b['recall']:.3f} | – | – | – |")
    for m, r in res["methods"].items():
        b = r["generated"]
        lines.append(f"| {m} ({r['transform']}, w={r['window']}) | {b['fid']:.2f} | {b['kid']:.4f} | "
                     f"{b['precision']:.3f} | {b['recall']:.3f} | {r['cdr']:.3f} | {r['train_s']:.0f} | "
                     f"{r['images_per_s']:.1f} |")
    s = res["settings"]
    return "\n".join([
        "### Image generation in TAEF2 latent space (Tiny-ImageNet 10 classes, 64 px)",
        "",
        f"Command: `{s['command']}`  ",
        f"Machine: {s['machine']}; {s['threads']} torch thread(s); {s['date']}.  ",
        f"Same DiT ({s['dit']}), {s['train_steps']} steps x batch {s['batch']}, seed {s['seed']}, "
        f"{s['sample_steps']} exact-increment sampler steps (source re-estimated), no guidance; "
        f"K-Flow window w={s['window']} ({s['profile']}).  ",
        f"Metrics on n = {n} generated vs {n} real val images (Inception pool features); real-vs-real = "
        f"{n} train vs the same val images; codec floor = TAEF2 reconstructions of those train images. "
        f"CDR = mean over classes of FID(label for first 30% of k) / FID(label throughout), per-class FID "
        f"on {n // 10} images per class (strongly biased at this size; compare methods, not absolute values).",
        "",
        *lines,
        "",
        f"Total wall-clock: {res['total_s'] / 60:.1f} min.",
    ])


def write_markdown(path: Path, section: str) -> None:
    block = f"{START}\n{section}\n{END}"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if START in text and END in text:
        a, b = text.index(START), text.index(END) + len(END)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", help="the shared folder (default $KFLOW_SHARED or ../shared)")
    ap.add_argument("--methods", default="baseline,fourier,wavelet,pca")
    ap.add_argument("--train-steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--window", type=float, default=0.3, help="K-Flow band window w")
    ap.add_argument("--profile", default="smoothstep")
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--n-eval", type=int, default=250, help="generated = real images per metric (multiple of 10)")
    ap.add_argument("--class-drop-at", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="smoke settings: 300 steps, n-eval 100, 20 sampler steps")
    ap.add_argument("--out-json", default=str(REPO / "benchmarks" / "results" / "image_latent.json"))
    ap.add_argument("--markdown", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--run-root", default=str(REPO / "benchmarks" / "runs" / "image_latent"))
    args = ap.parse_args(argv)
    if args.quick:
        args.train_steps, args.n_eval, args.sample_steps = 300, 100, 20
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n_eval % 10:
        raise SystemExit("--n-eval must be a multiple of 10 (balanced classes)")
    shared = shared_dir(args.shared, require=TINY_IMAGENET_TAR)
    if shared is None:
        print("image_latent: Tiny-ImageNet tar not found (pass --shared or set KFLOW_SHARED); skipping")
        return 0
    t_all = time.perf_counter()
    dev = torch.device(args.device)

    # ---- data -> TAEF2 latents (cached)
    dcfg = {"name": "tiny-imagenet", "tar": str(shared / TINY_IMAGENET_TAR), "resolution": 64, "channels": 3,
            "codec": "taef2"}
    codec = make_codec(dcfg).to(dev)
    t0 = time.perf_counter()
    data = load_image_data(dcfg, codec, progress=sys.stderr.isatty(), heldout=False)
    train_set, val_set, (raw_tr, y_tr) = data.train_set, data.heldout_set, data.train
    encode_s = time.perf_counter() - t0
    z_tr = standardized_latents(codec, raw_tr)
    shape = tuple(z_tr.shape[1:])
    ncls = int(y_tr.max()) + 1
    print(f"train latents {tuple(z_tr.shape)}, {ncls} classes (encode/cache {encode_s:.0f} s)", flush=True)

    # ---- real references
    per = args.n_eval // ncls
    iv = balanced_indices(torch.tensor([val_set[i][1] for i in range(len(val_set))]), per, args.seed)
    it = balanced_indices(y_tr, per, args.seed + 1)
    real_val = torch.stack([val_set[int(i)][0] for i in iv])
    real_val_y = torch.tensor([val_set[int(i)][1] for i in iv])
    real_tr = torch.stack([train_set[int(i)][0] for i in it])
    with torch.no_grad():
        recon = torch.cat([codec.decode(codec.encode(real_tr[i:i + 64].to(dev))).cpu() for i in range(0, len(it), 64)])
    inc = InceptionFeatures(device=dev)
    t0 = time.perf_counter()
    f_val, f_tr, f_rec = (inc.features(x, batch_size=50) for x in (real_val, real_tr, recon))
    inc_s = (time.perf_counter() - t0) / (3 * len(iv))
    print(f"inception: {inc_s:.3f} s/image", flush=True)
    results = {"real_vs_real": metrics_block(f_val, f_tr), "codec_reconstruction": metrics_block(f_val, f_rec),
               "methods": {}}
    run_root = Path(args.run_root)
    grids = []
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        spec = METHODS[name]
        window = spec.get("window", args.window)
        sched = BandSchedule(window, args.profile if window < 1 else "linear")
        torch.manual_seed(args.seed)
        task = make_task(spec["transform"], shape, sched, wave=spec.get("wave", "haar"), fit_data=z_tr,
                         num_classes=ncls, label_dropout=0.1)
        model = DiT(in_channels=shape[0], input_size=shape[1], patch_size=1, hidden_size=args.width,
                    depth=args.depth, num_heads=4, num_classes=ncls)
        cfg = TrainConfig(steps=args.train_steps, batch_size=args.batch, lr=args.lr, warmup_steps=min(100, args.train_steps // 10),
                          min_lr_ratio=0.05, ema_decay=0.999, seed=args.seed, device=str(dev), progress=False,
                          run_dir=str(run_root / name), ckpt_every=0, log_every=50)
        res = fit(model, task, z_tr, y_tr, cfg, run_config={"method": name, **vars(args)})
        out, train_s = res.out, res.train_s
        run = ImageRun(codec, task, res.trainer.ema_model.eval(), shape, ncls, dev,
                       solver=SolverConfig(steps=args.sample_steps))
        labels = real_val_y.to(dev)
        t0 = time.perf_counter()
        imgs = generate(run, labels, len(labels), args.seed + 7, batch_size=100)
        gen_s = time.perf_counter() - t0
        drop = generate(run, labels, len(labels), args.seed + 7, batch_size=100, class_drop_at=args.class_drop_at)
        f_gen, f_drop = inc.features(imgs, batch_size=50), inc.features(drop, batch_size=50)
        yv = real_val_y.numpy()
        fid_full, fid_drop = class_fid(f_val, yv, f_gen, yv), class_fid(f_val, yv, f_drop, yv)
        results["methods"][name] = {
            "transform": spec["transform"], "window": window, "final_loss": out.get("loss"),
            "generated": metrics_block(f_val, f_gen), "generated_class_drop": metrics_block(f_val, f_drop),
            "cdr": class_drop_ratio(fid_full, fid_drop), "class_fid_full": fid_full, "class_fid_drop": fid_drop,
            "train_s": train_s, "train_samples_per_s": args.train_steps * args.batch / train_s,
            "sample_s": gen_s, "images_per_s": len(labels) / gen_s,
        }
        show = torch.cat([imgs[real_val_y == c][:2] for c in range(ncls)] +
                         [drop[real_val_y == c][:2] for c in range(ncls)])
        grids.append(save_grid(show, run_root / f"{name}_samples.png", nrow=2 * ncls))
        r = results["methods"][name]
        print(f"{name}: FID {r['generated']['fid']:.2f} KID {r['generated']['kid']:.4f} CDR {r['cdr']:.3f} "
              f"train {train_s:.0f} s, {r['images_per_s']:.1f} img/s", flush=True)

    results["total_s"] = time.perf_counter() - t_all
    cpu = platform.processor() or platform.machine()
    results["settings"] = {
        **{k: v for k, v in vars(args).items() if k not in ("out_json", "markdown", "run_root")},
        "n_eval": args.n_eval, "dit": f"width {args.width}, depth {args.depth}, patch 1 on 32x8x8, "
                                     f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params",
        "command": "python benchmarks/image_latent.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
        "encode_s": encode_s, "inception_s_per_image": inc_s, "grids": [str(g) for g in grids],
        "train_images": len(z_tr),
    }
    out = Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=2, default=lambda o: float(o) if isinstance(o, np.floating) else str(o)))
    write_markdown(Path(args.markdown), fmt_table(results))
    print(fmt_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
