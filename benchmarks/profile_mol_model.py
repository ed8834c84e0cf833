"""Speed and memory of the molecular assembly network (kflow_mol.model.AssemblyNet) on CPU.

Measures, with ``torch.set_num_threads(--threads)`` (default 2):

* training throughput: forward + backward (+ an Adam step) in clusters/s at batch 8 and 16;
* forward-only throughput at the same batch sizes;
* inference latency: ms per forward at batch 1 with a precomputed template cache (what the sampler does
  at each of its steps), and the implied seconds for a 50-step assembly;
* peak RSS of the process.

Clusters are real ones cut from ``<shared>/data/crystals/pyxtal_testdb/*.cif`` with
``kflow_mol.cif.cluster_from_cif`` when the shared folder is found (``--shared`` or ``KFLOW_SHARED``) and
otherwise synthetic (random-walk molecules on a packed lattice). Each cluster is timed in its packed state
and in a loose state (centroids expanded x2 about the cluster centre + 3 Å jitter, random rotations):
packed states have the most inter-molecular contacts, so they are the slow case.

``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` here (see the comment at the imports). Wall-clock figures
depend on the machine load: the script records the 1-minute load average and the CPU
time of the process next to every figure.

    python benchmarks/profile_mol_model.py --out benchmarks/results/mol_model_profile.json [--profile]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

# Must be set before torch (libgomp) starts: with the default active spin-wait, 2 OpenMP threads on a
# 2-core machine that is also running anything else slow this model down 10-50x (measured: 18 s instead of
# 0.4 s CPU per training step). PASSIVE makes idle threads sleep.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kflow_mol import so3
from kflow_mol.batch import RigidState, collate
from kflow_mol.data import N_MOLECULES as M
from kflow_mol.model import AssemblyNet


def synthetic_clusters(num: int, n_min: int, n_max: int, seed: int = 0) -> list[dict]:
    """Random-walk molecules (1.45 Å steps, no overlaps < 1.1 Å) packed on a lattice sized by the molecule."""
    rng = np.random.default_rng(seed)
    out = []
    for idx in range(num):
        n = int(rng.integers(n_min, n_max + 1))
        pts = [np.zeros(3)]
        while len(pts) < n:
            step = rng.normal(size=3)
            cand = pts[int(rng.integers(len(pts)))] + 1.45 * step / np.linalg.norm(step)
            if min(np.linalg.norm(cand - p) for p in pts) > 1.1:
                pts.append(cand)
        t = np.array(pts)
        t -= t.mean(0)
        _, vecs = np.linalg.eigh(t.T @ t)
        t = t @ vecs
        species = rng.choice([1, 6, 7, 8], size=n, p=[0.45, 0.4, 0.08, 0.07])
        spacing = 2.0 * np.abs(t).max(0) * 0.75 + 1.5  # interpenetrating bounding boxes, as in crystals
        grid = np.array([(i, j, k) for i in range(-2, 3) for j in range(-2, 3) for k in range(-2, 3)], float)
        pos = grid * spacing
        order = np.argsort(np.linalg.norm(pos, axis=1))[:M]
        out.append({"id": f"synthetic-{idx}", "species": species, "template": t, "c": pos[order]})
    return out


def real_clusters(shared: Path, num: int, n_min: int, n_max: int) -> list[dict]:
    """Clusters cut from the pyxtal test CIFs, molecules with ``n_min <= n <= n_max`` atoms."""
    from kflow_mol.cif import cluster_from_cif
    from kflow_mol.data import BuildError
    from kflow_mol.frames import body_coordinates

    out = []
    for path in sorted((shared / "data/crystals/pyxtal_testdb").glob("*.cif")):
        try:
            rec = cluster_from_cif(path)
        except BuildError:  # bad or out-of-scope CIFs are expected in that folder
            continue
        n = rec.species.shape[0]
        if not n_min <= n <= n_max:
            continue
        final = torch.as_tensor(rec.final, dtype=torch.float64)
        template, _ = body_coordinates(final[0])
        c = final.mean(1)
        R = so3.kabsch(template.expand(M, -1, -1), final)
        out.append({"id": rec.id, "species": rec.species, "template": template.numpy(), "c": c.numpy(),
                    "R": R.numpy()})
        if len(out) >= num:
            break
    return out


def states(clusters: list[dict], loose: bool, seed: int = 0) -> RigidState:
    gen = torch.Generator().manual_seed(seed)
    c = torch.stack([torch.as_tensor(cl["c"], dtype=torch.float32) for cl in clusters])
    if "R" in clusters[0] and not loose:
        R = torch.stack([torch.as_tensor(cl["R"], dtype=torch.float32) for cl in clusters])
    else:
        R = so3.random_rotation((len(clusters), M), gen, dtype=torch.float32)
    if loose:
        centre = c.mean(1, keepdim=True)
        c = centre + 2.0 * (c - centre) + 3.0 * torch.randn(c.shape, generator=gen)
    return RigidState(c, R)


def _timeit(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn`` over ``repeats`` (after one warm-up)."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return float(np.median(walls)), float(np.median(cpus))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--n-min", type=int, default=20)
    ap.add_argument("--n-max", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shared", type=Path, default=os.environ.get("KFLOW_SHARED", REPO.parent / "shared"))
    ap.add_argument("--synthetic", action="store_true", help="use synthetic clusters even if CIFs exist")
    ap.add_argument("--model", type=str, default="{}", help="AssemblyNet kwargs as JSON")
    ap.add_argument("--node-features", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="print the top torch.profiler ops")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/mol_model_profile.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    nmax_b = max(args.batch_sizes)
    source = "synthetic"
    clusters = []
    if not args.synthetic and (Path(args.shared) / "data/crystals/pyxtal_testdb").is_dir():
        clusters = real_clusters(Path(args.shared), nmax_b, args.n_min, args.n_max)
        source = f"pyxtal_testdb ({len(clusters)} clusters)"
    if len(clusters) < nmax_b:
        clusters += synthetic_clusters(nmax_b - len(clusters), args.n_min, args.n_max)
        if source != "synthetic":
            source += " + synthetic"
    sizes = [len(cl["species"]) for cl in clusters]
    print(f"clusters: {source}; atoms per molecule {min(sizes)}..{max(sizes)} (mean {np.mean(sizes):.1f})")

    kwargs = json.loads(args.model)
    F = args.node_features
    t0 = time.perf_counter()
    model = AssemblyNet(node_feature_dim=F, **kwargs)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    result = {
        "machine": {"platform": platform.platform(), "threads": args.threads,
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "clusters": source, "atoms_per_molecule": {"min": min(sizes), "max": max(sizes),
                                                   "mean": float(np.mean(sizes))},
        "model": {"kwargs": kwargs, "params": n_params, "build_s": build_s}, "train": {}, "forward": {},
    }

    for loose in (False, True):
        tag = "loose" if loose else "packed"
        for B in args.batch_sizes:
            cl = clusters[:B]
            batch = collate([(x["species"], x["template"]) for x in cl], dtype=torch.float32)
            x = states(cl, loose)
            k = torch.rand(B)
            nf = torch.randn(B, M, F)
            target = torch.randn(B, M, 6)

            def train_step():
                out = model(x, k, batch=batch, node_features=nf)
                loss = (out - target).square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            def forward():
                with torch.no_grad():
                    model(x, k, batch=batch, node_features=nf)

            model.train()
            wall, cpu = _timeit(train_step, args.repeats)
            result["train"][f"{tag}_b{B}"] = {"clusters_per_s": B / wall, "wall_s": wall, "cpu_s": cpu,
                                              "load1": os.getloadavg()[0]}
            model.eval()
            wall, cpu = _timeit(forward, args.repeats)
            result["forward"][f"{tag}_b{B}"] = {"clusters_per_s": B / wall, "wall_s": wall, "cpu_s": cpu,
                                                "load1": os.getloadavg()[0]}
            print(f"{tag:6s} B={B:2d}: train {result['train'][f'{tag}_b{B}']['clusters_per_s']:6.1f} clusters/s"
                  f" (cpu {result['train'][f'{tag}_b{B}']['cpu_s']:.2f} s/step), forward "
                  f"{result['forward'][f'{tag}_b{B}']['clusters_per_s']:6.1f} clusters/s, load {os.getloadavg()[0]:.1f}")

    # Inference: one cluster, template cache computed once, as the sampler does.
    model.eval()
    lat = {}
    for loose in (False, True):
        tag = "loose" if loose else "packed"
        walls, cpus = [], []
        for cl in clusters[: min(8, len(clusters))]:
            batch = collate([(cl["species"], cl["template"])], dtype=torch.float32)
            x = states([cl], loose)
            k = torch.rand(1)
            nf = torch.randn(1, M, F)
            with torch.no_grad():
                cache = model.encode_templates(batch)
                w, c = _timeit(lambda: model(x, k, batch=batch, node_features=nf, template_cache=cache),
                               args.repeats)
            walls.append(w)
            cpus.append(c)
        lat[tag] = {"ms_per_forward": 1e3 * float(np.median(walls)), "cpu_ms": 1e3 * float(np.median(cpus)),
                    "s_per_50_steps": 50 * float(np.median(walls)), "load1": os.getloadavg()[0]}
        print(f"{tag:6s} B=1 with cache: {lat[tag]['ms_per_forward']:.1f} ms/forward "
              f"({lat[tag]['s_per_50_steps']:.2f} s per 50 steps)")
    result["inference_b1"] = lat
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB; params {n_params}; build {build_s:.1f} s")

    if args.profile:
        from torch.profiler import profile

        B = args.batch_sizes[0]
        cl = clusters[:B]
        batch = collate([(x["species"], x["template"]) for x in cl], dtype=torch.float32)
        x, k, nf = states(cl, False), torch.rand(B), torch.randn(B, M, F)
        model.train()
        with profile() as prof:
            out = model(x, k, batch=batch, node_features=nf)
            out.square().sum().backward()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
