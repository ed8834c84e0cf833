"""``kflow-image``: train, sample and evaluate class-conditional K-Flow image models.

Sub-commands (``kflow-image <cmd> --help`` documents every flag)::

    kflow-image train    [--data mnist|tiny-imagenet|PATH] [--transform fourier|wavelet|pca|identity]
                         [--baseline] [--steps N] [--run-dir DIR] [--resume] [key=value ...]
    kflow-image sample   --ckpt RUN_DIR|FILE --out grid.png [--cfg-scale S] [--class-drop-at F]
                         [--split-bands KMIN[:KMAX]] [--restore data|IMAGE|FOLDER --degrade downsample|blur]
    kflow-image evaluate --ckpt RUN_DIR|FILE [--n N] [--json]

Everything after the flags that looks like ``key=value`` is a hydra override of ``configs/image.yaml``
(``data=``, ``model=`` and ``trainer=`` pick files of ``configs/image/{data,model,trainer}``; e.g.
``transform=wavelet transform.wave=db2 schedule=hard trainer.steps=3000 model=dit_small``).
The default ``train`` is class-conditional MNIST (the shipped test set, 32x32 pixels, identity codec):
a few minutes on 2 CPU cores; it writes ``config.json``, ``metrics.jsonl``, ``loss.png``, ``last.pt`` and a
sample grid ``samples.png`` into the run directory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from kflow.cli import (InputError, check_device, check_targets, compose, configs_dir, instantiate, run_command,
                       to_container)

CLASS_GROUPS = ("data", "model", "trainer")


# ------------------------------------------------------------------------------------------ config
def _rewrite_overrides(extra: list[str]) -> list[str]:
    """Map ``data=X``/``model=X``/``trainer=X`` onto the image groups; reject non-overrides."""
    bad = [e for e in extra if "=" not in e]
    if bad:
        raise InputError(f"unrecognised arguments {bad}; hydra overrides look like key=value")
    out = []
    for e in extra:
        key, _, val = e.partition("=")
        if key in CLASS_GROUPS:
            e = f"image/{key}@{key}={val}"
        out.append(e)
    return out


def _compose(extra: list[str], pre: list[str] | None = None):
    return compose("image", list(pre or []) + _rewrite_overrides(extra))


def _transform_name(tcfg: dict) -> str:
    target = str(tcfg.get("_target_", "")).rsplit(".", 1)[-1]
    names = {"IdentityTransform": "identity", "FourierTransform": "fourier", "WaveletTransform": "wavelet",
             "PCATransform": "pca"}
    if target not in names:
        raise InputError(f"transform {target!r} is not an image transform; use one of "
                         f"transform=identity|fourier|wavelet|pca")
    return names[target]


def _shared_dir() -> Path | None:
    env = os.environ.get("KFLOW_SHARED")
    cands = [Path(env)] if env else []
    cands.append(configs_dir().parent.parent / "shared")
    return next((c for c in cands if (c / "data").is_dir()), None)


# ------------------------------------------------------------------------------------------ data
def load_image_sets(dcfg: dict) -> dict:
    """Training and held-out image datasets described by a ``data`` config (nothing is encoded).

    Returns:
        ``{"train_set", "heldout_set", "identity": cache-key base or None, "num_classes"}``.
    """
    from torch.utils.data import Subset

    from kflow_image.data import ImageFolderDataset, MNISTDataset, TarImageDataset

    name = dcfg["name"]
    res, ch = int(dcfg["resolution"]), int(dcfg["channels"])
    if name == "mnist":
        full = MNISTDataset(dcfg.get("root"), "test", resolution=res, channels=ch)
        hold = int(dcfg.get("holdout") or 0)
        if hold >= len(full):
            raise InputError(f"data.holdout={hold} leaves no MNIST training images (have {len(full)})")
        train_set, held_set = Subset(full, range(len(full) - hold)), Subset(full, range(len(full) - hold, len(full)))
        ident = f"{full.identity()}:h{hold}"
    elif name == "tiny-imagenet":
        tar = dcfg.get("tar")
        if tar is None:
            shared = _shared_dir()
            if shared is None:
                raise InputError("Tiny-ImageNet tar not found: pass data.tar=PATH or set KFLOW_SHARED")
            tar = shared / "data" / "images" / "tiny-imagenet-64-10class.tar"
        if not Path(tar).exists():
            raise InputError(f"Tiny-ImageNet tar not found: {tar}")
        train_set = TarImageDataset(tar, "train", resolution=res, channels=ch)
        held_set = TarImageDataset(tar, "val", resolution=res, channels=ch)
        ident = None
    elif name == "folder":
        full = ImageFolderDataset(dcfg["root"], res, ch)
        hold = int(dcfg.get("holdout") or 0)
        if hold >= len(full):
            raise InputError(f"data.holdout={hold} leaves no training images in {dcfg['root']}")
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(0)).tolist()
        train_set, held_set = Subset(full, perm[hold:]), Subset(full, perm[:hold])
        ident = full.identity() + f":perm0:h{hold}"
    else:
        raise InputError(f"unknown data {name!r} (mnist | tiny-imagenet | folder with data.root=PATH)")
    limit = dcfg.get("limit")
    if limit:
        train_set = Subset(train_set, range(min(int(limit), len(train_set))))
    n_cls = dcfg.get("num_classes")
    if n_cls is None:
        base = train_set
        while isinstance(base, Subset):
            base = base.dataset
        n_cls = getattr(base, "num_classes", 0)
    return {"train_set": train_set, "heldout_set": held_set, "identity": ident, "num_classes": int(n_cls)}


def load_image_data(dcfg: dict, codec, cache: bool = True, progress: bool = True) -> dict:
    """:func:`load_image_sets` plus the raw (unstandardised) latents, cached on disk.

    Returns:
        The sets dict with ``"train": (latents, labels)`` and ``"heldout": (latents, labels) | None``.
    """
    from torch.utils.data import Subset

    from kflow_image.data import default_cache_dir, encode_latents

    out = load_image_sets(dcfg)
    cache_dir = default_cache_dir() / "latents" if cache else None

    def enc(ds, tag):
        key = None
        if isinstance(ds, Subset):
            key = f"{out['identity']}|{tag}|{len(ds)}|{codec.identity()}"
        return encode_latents(ds, codec, cache_dir, progress=progress, cache_key=key)

    out["train"] = enc(out["train_set"], "train")
    out["heldout"] = enc(out["heldout_set"], "heldout") if len(out["heldout_set"]) else None
    return out


# ------------------------------------------------------------------------------------------ build
def build_model(mcfg: dict, event_shape: tuple[int, int, int], num_classes: int, prediction: str):
    """The DiT for latents of shape ``(C, H, W)`` from a ``model`` config."""
    from kflow_image.dit import build_dit

    c, h, w = event_shape
    patch = mcfg.get("patch_size") or max(1, min(h, w) // 8)
    return build_dit(mcfg.get("preset"), in_channels=c, input_size=h if h == w else (h, w), patch_size=patch,
                     hidden_size=mcfg.get("hidden_size"), depth=mcfg.get("depth"),
                     num_heads=mcfg.get("num_heads"), mlp_ratio=mcfg.get("mlp_ratio"),
                     num_classes=num_classes, prediction=prediction)


def build_task(cfg: dict, event_shape, num_classes: int, fit_data=None, state_dict=None):
    from kflow_image.task import make_task

    tcfg = cfg["transform"]
    name = _transform_name(tcfg)
    sch = instantiate({k: v for k, v in cfg["schedule"].items()})
    t = cfg["task"]
    return make_task(name, event_shape, sch, wave=tcfg.get("wave", "haar"), levels=tcfg.get("levels"),
                     fit_data=fit_data, energy_warp=bool(t.get("energy_warp")), state_dict=state_dict,
                     num_classes=num_classes, label_dropout=t["label_dropout"], k_sampling=t["k_sampling"],
                     logit_mean=t["logit_mean"], logit_std=t["logit_std"], prediction=t["prediction"],
                     loss_weighting=t["loss_weighting"])


def load_run(ckpt: str | Path, device: str = "auto") -> dict:
    """Rebuild codec, EMA model and task from a training checkpoint (``last.pt`` or its run folder)."""
    from kflow.train import load_model_weights
    from kflow.utils import load_checkpoint

    dev = check_device(device)
    path = Path(ckpt)
    if path.is_dir():
        path = path / "last.pt"
    blob = load_checkpoint(path)
    cfg = blob.get("run_config") or {}
    extra = blob.get("extra") or {}
    if "image" not in extra:
        raise InputError(f"{path} is not a kflow-image checkpoint (no image state)")
    check_targets(cfg, str(path))  # checkpoints are shared: build only this package's own classes
    info = extra["image"]
    try:
        codec = _make_codec(cfg["data"])
        codec.load_state_dict(info["codec"])
        shape = tuple(int(s) for s in info["event_shape"])
        task = build_task(cfg, shape, int(info["num_classes"]), state_dict=info["task"])
        model = build_model(cfg["model"], shape, int(info["num_classes"]), cfg["task"]["prediction"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # missing keys, wrong shapes or types
        raise InputError(f"{path}: damaged checkpoint: its stored config and state do not rebuild a model "
                         f"({type(err).__name__}: {str(err)[:300]})") from None
    load_model_weights(model, path, use_ema=True)
    model.to(dev).eval()
    codec.to(dev).eval()
    task.to(dev)
    return {"cfg": cfg, "codec": codec, "task": task, "model": model, "event_shape": shape, "device": dev,
            "num_classes": int(info["num_classes"]), "path": path, "step": int(blob.get("step", 0))}


def _make_codec(dcfg: dict):
    from kflow_image.codecs import make_codec

    if dcfg["codec"] == "identity":
        return make_codec("identity", channels=int(dcfg["channels"]))
    return make_codec(dcfg["codec"], image_channels=int(dcfg["channels"]))


def _labels_for(n: int, num_classes: int, classes: list[int] | None, device) -> torch.Tensor | None:
    if num_classes == 0:
        return None
    pool = classes if classes else list(range(num_classes))
    bad = [c for c in pool if not 0 <= c < num_classes]
    if bad:
        raise InputError(f"classes {bad} outside 0..{num_classes - 1}")
    return torch.tensor([pool[i % len(pool)] for i in range(n)], device=device)


@torch.no_grad()
def generate(run: dict, labels: torch.Tensor | None, n: int, seed: int, batch_size: int = 64,
             cfg_scale: float = 1.0, class_drop_at: float | None = None, steps: int | None = None,
             progress: bool = False) -> torch.Tensor:
    """Generate ``n`` decoded images ``(n, C, H, W)`` in [0, 1] (batched, seeded)."""
    cfg, task, model, codec = run["cfg"], run["task"], run["model"], run["codec"]
    s = cfg["solver"]
    g = torch.Generator().manual_seed(seed)
    out = []
    rng = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm
        rng = tqdm(rng, desc="sampling", unit="batch")
    for i in rng:
        m = min(batch_size, n - i)
        y = None if labels is None else labels[i:i + m]
        x_0 = torch.randn((m, *run["event_shape"]), generator=g)
        sol = task.sample(model, y=y, x_0=x_0.to(run["device"]), steps=steps or s["steps"], grid_kind=s["grid"],
                          method=s["method"], cfg_scale=cfg_scale, class_drop_at=class_drop_at,
                          x0_mode=cfg["sample"]["x0_mode"], cfg_interval=cfg["sample"].get("cfg_interval"))
        out.append(codec.decode(sol.x_1).cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------ commands
def cmd_train(args, extra) -> int:
    from torch.utils.data import TensorDataset, default_collate

    from kflow.train import TrainConfig, Trainer
    from kflow.utils import seed_everything
    from kflow_image.sampling import save_grid, save_labelled_grid

    pre = []
    if args.data:
        known = (configs_dir() / "image" / "data" / f"{args.data}.yaml").exists()
        pre += [f"image/data@data={args.data}"] if known else ["image/data@data=folder", f"data.root={args.data}"]
    if args.baseline:
        pre += ["transform=identity", "schedule=flow"]
    elif args.transform:
        pre += [f"transform={args.transform}"]
    if args.steps:
        pre += [f"trainer.steps={args.steps}"]
    if args.run_dir:
        pre += [f"trainer.run_dir={args.run_dir}"]
    if args.device:
        pre += [f"trainer.device={args.device}"]
    cfg = to_container(_compose(extra, pre))
    tcfg = TrainConfig.from_dict(cfg["trainer"])
    dev = check_device(tcfg.device)  # before the data is encoded: a missing GPU is reported at once
    seed_everything(tcfg.seed)  # the model's initial weights too: identical commands give identical runs
    codec = _make_codec(cfg["data"])
    data = load_image_data(cfg["data"], codec, progress=tcfg.progress and sys.stderr.isatty())
    raw, labels = data["train"]
    codec.fit_stats(raw)
    z = codec.standardize(raw).float()
    shape = tuple(z.shape[1:])
    ncls = data["num_classes"]
    task = build_task(cfg, shape, ncls, fit_data=z)
    model = build_model(cfg["model"], shape, ncls, cfg["task"]["prediction"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"kflow-image train: {cfg['data']['name']} {len(z)} x {tuple(shape)} latents, {ncls} classes, "
          f"transform={_transform_name(cfg['transform'])} window={cfg['schedule'].get('window')}, "
          f"DiT {n_params / 1e6:.2f} M params -> {tcfg.run_dir}", file=sys.stderr)
    task.to(dev)
    extra_state = {"image": {"codec": codec.state_dict(), "task": task.state_dict(), "event_shape": list(shape),
                             "num_classes": ncls}}
    trainer = Trainer(model, task.loss, TensorDataset(z, labels), default_collate, tcfg,
                      extra_state=extra_state, run_config=cfg)
    t0 = time.perf_counter()
    out = trainer.fit(resume=bool(args.resume))
    train_s = time.perf_counter() - t0
    if not trainer.is_main:
        return 0
    run = {"cfg": cfg, "codec": codec.to(dev), "task": task, "model": trainer.ema_model.eval(),
           "event_shape": shape, "device": dev, "num_classes": ncls}
    per = int(cfg["sample"]["per_class"])
    n = per * ncls if ncls else per * 8
    y = None if ncls == 0 else torch.arange(ncls, device=dev).repeat_interleave(per)
    t0 = time.perf_counter()
    imgs = generate(run, y, n, cfg["sample"]["seed"], cfg_scale=cfg["sample"]["cfg_scale"],
                    class_drop_at=cfg["sample"]["class_drop_at"])
    scale = 2 if imgs.shape[-1] <= 32 else 1
    grid = (save_grid(imgs, Path(tcfg.run_dir) / "samples.png", nrow=per, scale=scale) if y is None else
            save_labelled_grid(imgs, y, Path(tcfg.run_dir) / "samples.png", per_row=per, scale=scale))
    summary = {"step": out.get("step"), "loss": out.get("loss"), "train_s": round(train_s, 1),
               "sample_s": round(time.perf_counter() - t0, 1), "samples": str(grid),
               "checkpoint": str(Path(tcfg.run_dir) / "last.pt")}
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


def _restore_inputs(run: dict, spec: str, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clean images ``(n, C, H, W)`` and labels (``None`` for user images) for ``--restore``."""
    from kflow_image.data import IMAGE_EXTENSIONS, load_image

    d = run["cfg"]["data"]
    res, ch = int(d["resolution"]), int(d["channels"])
    if spec == "data":
        data = load_image_sets(d)
        ds = data["heldout_set"] if len(data["heldout_set"]) else data["train_set"]
        items = [ds[i] for i in range(min(n, len(ds)))]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)[:n]
        if not files:
            raise InputError(f"no images in {p}")
    elif p.is_file():
        files = [p]
    else:
        raise InputError(f"--restore: {p} is neither 'data', an image nor a folder")
    return torch.stack([load_image(f, res, ch) for f in files]), None


def cmd_sample(args, extra) -> int:
    from kflow_image.sampling import degrade, psnr, restore, save_grid, save_labelled_grid, split_noise

    run = load_run(args.ckpt, args.device)
    if extra:  # sampler-side overrides (solver.steps=..., sample.x0_mode=...)
        import yaml
        from omegaconf import OmegaConf
        base = OmegaConf.create(run["cfg"])
        for e in extra:
            if "=" not in e:
                raise InputError(f"unrecognised argument {e!r}; overrides look like solver.steps=20")
            key, _, val = e.partition("=")
            OmegaConf.update(base, key, yaml.safe_load(val), merge=True)
        run["cfg"] = OmegaConf.to_container(base, resolve=True)
    cfg, task, model, codec, dev = run["cfg"], run["task"], run["model"], run["codec"], run["device"]
    if args.cfg_scale is None:  # the guidance the run was configured to sample with
        args.cfg_scale = float(cfg["sample"].get("cfg_scale", 1.0))
    steps = args.steps or cfg["solver"]["steps"]
    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    n = args.n or (32 if args.restore or args.split_bands or args.uncond
                   else 8 * (len(classes) if classes else run["num_classes"]) or 32)  # grids: 8 per class
    labels = None if args.uncond else _labels_for(n, run["num_classes"], classes, dev)
    out = Path(args.out)
    t0 = time.perf_counter()
    info: dict = {"out": str(out)}
    if args.restore:
        clean, y = _restore_inputs(run, args.restore, n)
        obs = degrade(clean, args.degrade, factor=args.factor, sigma=args.sigma)
        g = torch.Generator().manual_seed(args.seed)
        y = None if (args.uncond or run["num_classes"] == 0 or y is None) else y.to(dev)
        restored, _ = restore(task, model, codec, obs, y=y, kappa_max=args.restore_kappa, steps=steps,
                              cfg_scale=args.cfg_scale, generator=g, method=cfg["solver"]["method"])
        restored = restored.cpu()
        recon = codec.decode(codec.encode(obs.to(dev))).cpu()
        info.update(psnr_observation=float(psnr(obs, clean).mean()), psnr_restored=float(psnr(restored, clean).mean()),
                    psnr_observation_through_codec=float(psnr(recon, clean).mean()))
        save_grid(torch.cat([clean, obs, restored]), out, nrow=len(clean))
        info["rows"] = ["clean", f"degraded ({args.degrade})", f"restored (kappa <= {args.restore_kappa})"]
    elif args.split_bands:
        lo, hi = _parse_bands(args.split_bands)
        g = torch.Generator().manual_seed(args.seed)
        rows, per = max(1, args.rows), max(1, n // max(1, args.rows))
        imgs = []
        for r in range(rows):
            x_0, _ = split_noise(task.transform, per, run["event_shape"], lo, hi, generator=g)
            y = None if labels is None else labels[:per]
            sol = task.sample(model, y=y, x_0=x_0, steps=steps, grid_kind=cfg["solver"]["grid"],
                              method=cfg["solver"]["method"], cfg_scale=args.cfg_scale,
                              class_drop_at=args.class_drop_at, x0_mode=cfg["sample"]["x0_mode"])
            imgs.append(codec.decode(sol.x_1).cpu())
        save_grid(torch.cat(imgs), out, nrow=per)
        info["rows"] = f"{rows} rows; noise of scales in [{lo}, {hi}] shared within a row"
    else:
        imgs = generate(run, labels, n, args.seed, cfg_scale=args.cfg_scale, class_drop_at=args.class_drop_at,
                        steps=steps)
        scale = 2 if imgs.shape[-1] <= 32 else 1
        if labels is None:
            save_grid(imgs, out, nrow=args.nrow, scale=scale)
        else:  # one labelled row per class
            save_labelled_grid(imgs, labels.cpu(), out, per_row=args.nrow, scale=scale)
        if args.npz:  # raw samples: images (N, C, H, W) float32 in [0, 1], labels (N,) (-1 = unconditional)
            import numpy as np
            lab = labels.cpu().numpy() if labels is not None else np.full(n, -1)
            Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.npz, images=imgs.float().clamp(0, 1).numpy(), labels=lab.astype(np.int64))
            info["npz"] = str(args.npz)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(info))
    return 0


def cmd_evaluate(args, extra) -> int:
    import numpy as np

    from kflow_image.metrics import InceptionFeatures, fid_from_features, kid, precision_recall

    run = load_run(args.ckpt, args.device)
    cfg, codec, dev = run["cfg"], run["codec"], run["device"]
    if args.cfg_scale is None:
        args.cfg_scale = float(cfg["sample"].get("cfg_scale", 1.0))
    ecfg = cfg.get("evaluate", {})
    n = args.n or int(ecfg.get("n", 256))
    data = load_image_sets(cfg["data"])
    held, train_set = data["heldout_set"], data["train_set"]
    if len(held) < n or len(train_set) < n:
        raise InputError(f"--n {n} needs {n} held-out and {n} training images "
                         f"(have {len(held)} and {len(train_set)})")
    g = torch.Generator().manual_seed(args.seed)
    idx_h = torch.randperm(len(held), generator=g)[:n].tolist()
    idx_t = torch.randperm(len(train_set), generator=g)[:n].tolist()
    real = torch.stack([held[i][0] for i in idx_h])
    real_labels = torch.tensor([held[i][1] for i in idx_h])
    real_train = torch.stack([train_set[i][0] for i in idx_t])
    inc = InceptionFeatures(device=dev)
    feats = lambda x: inc.features(x, batch_size=int(ecfg.get("batch_size", 64)))
    t0 = time.perf_counter()
    labels = None if run["num_classes"] == 0 else real_labels.to(dev)  # same class histogram as the real set
    gen = generate(run, labels, n, args.seed, cfg_scale=args.cfg_scale, class_drop_at=args.class_drop_at,
                   steps=args.steps)
    gen_s = time.perf_counter() - t0
    recon = torch.cat([codec.decode(codec.encode(real_train[i:i + 64].to(dev))).cpu() for i in range(0, n, 64)])
    f_real, f_train, f_gen, f_rec = feats(real), feats(real_train), feats(gen), feats(recon)
    sub = min(int(ecfg.get("kid_subset", 100)), n)
    knn = int(ecfg.get("knn", 3))

    def block(f):
        p, r = precision_recall(f_real, f, k=knn)
        km, ks = kid(f_real, f, subset_size=sub)
        return {"fid": fid_from_features(f_real, f), "kid": km, "kid_std": ks, "precision": p, "recall": r}

    result = {"checkpoint": str(run["path"]), "step": run["step"], "n": n, "data": cfg["data"]["name"],
              "transform": _transform_name(cfg["transform"]), "window": cfg["schedule"].get("window"),
              "cfg_scale": args.cfg_scale, "class_drop_at": args.class_drop_at,
              "steps": args.steps or cfg["solver"]["steps"],
              "generated": block(f_gen), "real_vs_real": block(f_train), "codec_reconstruction": block(f_rec),
              "generation_s": round(gen_s, 2), "images_per_s": round(n / gen_s, 2)}
    if args.json:
        print(json.dumps(result, indent=2, default=lambda o: float(o) if isinstance(o, np.floating) else str(o)))
    else:
        print(f"{'':24s} {'FID':>8s} {'KID':>9s} {'prec':>6s} {'recall':>6s}   (n = {n})")
        for k in ("generated", "real_vs_real", "codec_reconstruction"):
            b = result[k]
            print(f"{k:24s} {b['fid']:8.2f} {b['kid']:9.5f} {b['precision']:6.3f} {b['recall']:6.3f}")
        print(f"generation: {result['images_per_s']} images/s")
    return 0


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kflow-image", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    s.add_argument("--cfg-scale", type=float,
                   help="classifier-free guidance scale (1 = none; default: the run's sample.cfg_scale)")
    s.add_argument("--class-drop-at", type=float,
                   help="keep the label only for k < this fraction, null class after (paper: 0.3)")
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
    s.add_argument("--steps", type=int, help="sampler steps (default: the run's solver.steps)")
    s.add_argument("--nrow", type=int, help="images per grid row")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")

    e = sub.add_parser("evaluate", parents=[common], help="FID/KID/precision/recall beside real-vs-real and the codec floor")
    e.add_argument("--ckpt", required=True, help="run folder or checkpoint file")
    e.add_argument("--n", type=int, help="sample size (default: the run's evaluate.n)")
    e.add_argument("--cfg-scale", type=float, help="guidance scale (default: the run's sample.cfg_scale)")
    e.add_argument("--class-drop-at", type=float)
    e.add_argument("--steps", type=int, help="sampler steps")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)}")
    cmd = {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate}[args.cmd]
    if args.threads:
        torch.set_num_threads(args.threads)
    # exit codes: 0 ok, 2 bad input (one `error:` line naming the file and the reason), 1 internal failure
    return run_command(cmd, args, extra, bad_input=(ValueError,))


if __name__ == "__main__":
    raise SystemExit(main())
