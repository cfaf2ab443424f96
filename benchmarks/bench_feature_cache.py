"""Backbone forward calls and wall time with and without the frozen-feature cache, in one run.

    python benchmarks/bench_feature_cache.py [--mode methods] [--episodes 8] [--runs 3] [--image-size 128]
                                             [--rows nr,plain] [--fold 0] [--shot 1]
    python benchmarks/bench_feature_cache.py --mode encoder [--episodes 200] [--encoder resnet18] [--size 256]

``--mode methods`` (default): the comparison of the SOFS tables on one manifest. The real
``prepare`` / ``predict`` of SOFS, PFENet and HDMNet (their ``test`` presets, heads random, all on the
same frozen encoder: random-init ResNet-18, merged layer2+3 with ``--merge-dim`` channels, inputs of
``--image-size`` px, CPU) run on the first ``--episodes`` episodes of each of the synthetic FSS
manifests of seeds 0 .. ``--runs``-1 of one fold (the repeated test runs). Two sets of rows:

* ``nr``: SOFS, PFENet+NR and HDMNet+NR (SOFS Tables 1/2 "+NR+MNDL" rows): native-resolution windows
  of the protocol's crop size (PFENet's ``window`` set to it; its default is ``image_size``), support
  crops of the manifest;
* ``plain``: SOFS, PFENet and HDMNet as the tables' plain rows (PFENet and HDMNet resize whole
  images, ``test_path=resize`` / ``nr=False``).

Per set, three passes over the same episodes (methods one after the other, as ``make bench`` runs them):
  A. no cache (the backbone on every batch: what running the methods separately costs today);
  B. a cache per method (memory, emptied between methods: within-method repeats only);
  C. the shared cache of ``make bench``: memory emptied between methods (each method is its own
     process there), the disk layer shared by all of them.
Printed: backbone calls and images encoded per method and in total, wall time, the ratios A/C and
B/C, and whether every output of B and C equals A's (sha256 of the probability maps).

``--mode encoder``: one encoder on the windows and crops of the episodes (what a SOFS-style method
encodes). Per episode the encoder sees

* the support: each defect-centred crop box of the manifest (``--size`` px, native resolution), or
  the whole image resized to ``--size`` (longest side, zero padded) when the manifest keeps it whole;
* the query: non-resizing sliding windows of ``--size`` px covering the image at native resolution
  (last row/column shifted to the border), one batch per query.

Three passes over the same episodes, same process, same inputs:
  A. no cache: ``bb.forward_features`` on every batch;
  B. ``CachedBackbone(bb)`` in memory (fresh): repeats of a window/crop/support batch are not encoded again;
  C. a second fresh ``CachedBackbone`` on the on-disk dir filled by B ("the next run of the same
     manifest").
A and B are interleaved batch by batch (alternating which goes first), so both see the same load
on a shared machine; C runs after them.
Printed per pass: backbone forward calls, images encoded, encoder time (sum of forward_features
calls), wall time (encoder time + the batch preparation, charged to every pass; image decoding is
done once before the passes and not timed), and the ratio A / B (and A / C). Outputs of B are checked
against A on the first episodes.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fdsbench.blocks.backbones import build_backbone, imagenet_normalize  # noqa: E402
from fdsbench.blocks.features import CachedBackbone  # noqa: E402


def windows(h: int, w: int, size: int):
    th, tw = min(size, h), min(size, w)
    nh, nw = math.ceil(h / th), math.ceil(w / tw)
    rows = [(a * th, (a + 1) * th) if a < nh - 1 else (h - th, h) for a in range(nh)]
    cols = [(b * tw, (b + 1) * tw) if b < nw - 1 else (w - tw, w) for b in range(nw)]
    return [(t, l, b, r) for t, b in rows for l, r in cols]


def to_input(img: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [h,w,3] -> normalised [3,size,size]: longest side resized to ``size`` if larger
    (bilinear), zero padding bottom/right after normalisation."""
    h, w = img.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255).unsqueeze(0)
    if max(h, w) > size:
        s = size / max(h, w)
        nh, nw = int(h * s + 0.5), int(w * s + 0.5)
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        h, w = nh, nw
    x = imagenet_normalize(x)[0]
    out = torch.zeros(3, size, size)
    out[:, :h, :w] = x
    return out


def build_workload(n_episodes: int, fold: int, shot: int, size: int):
    from fdsbench import episodes as E
    from fdsbench.datasets.synthetic import Synthetic

    ds = Synthetic()
    proto = E.resolve_protocol("fss", shot, {"crop_size": size}, getattr(ds, "protocol_defaults", None))
    eps, seeds = [], []
    seed = 0
    while len(eps) < n_episodes:
        body = E.generate(ds, fold, shot, seed, proto)
        eps += [E.Episode.from_json(e) for e in body["episodes"]]
        seeds.append(seed)
        seed += 1
    eps = eps[:n_episodes]
    images = {}
    for ep in eps:
        for ref in ep.supports:
            images.setdefault(ref.id, None)
        for q in ep.queries:
            images.setdefault(q, None)
    for i in images:
        images[i] = ds.load_image(i)
    return eps, images, seeds, ds


def episode_batches(ep, images, size):
    sup = []
    for ref in ep.supports:
        img = images[ref.id]
        if ref.crops is None:
            sup.append(to_input(img, size))
        else:
            for (t, l, b, r) in ref.crops:
                sup.append(to_input(img[t:b, l:r], size))
    out = [torch.stack(sup)]
    for q in ep.queries:
        img = images[q]
        out.append(torch.stack([to_input(img[t:b, l:r], size) for (t, l, b, r) in windows(*img.shape[:2], size)]))
    return out


def run_interleaved(encoders, eps, images, size, device, keep=0):
    """Run every encoder on every batch, alternating which goes first per batch, so that all of
    them see the same machine load (the CPU here is shared; sequential passes are not comparable)."""
    res = [{"wall": 0.0, "encoder": 0.0, "calls": 0, "images": 0, "kept": []} for _ in encoders]
    n = 0
    for k, ep in enumerate(eps):
        t_prep = time.perf_counter()
        batches = [b.to(device) for b in episode_batches(ep, images, size)]
        prep = time.perf_counter() - t_prep  # the same preparation cost is charged to every pass
        for r in res:
            r["wall"] += prep
        for batch in batches:
            order = list(range(len(encoders)))
            if n % 2:
                order.reverse()
            n += 1
            for j in order:
                t0 = time.perf_counter()
                feats = encoders[j](batch)
                if device != "cpu":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                r = res[j]
                r["encoder"] += dt
                r["wall"] += dt
                r["calls"] += 1
                r["images"] += batch.shape[0]
                if k < keep:
                    r["kept"].append([f.cpu() for f in feats])
    return res


# ---- methods mode: SOFS, PFENet and HDMNet on one manifest ------------------------------------------
#: (method, label, overrides of its ``test`` preset); window None = the protocol's crop size
ROWS = {
    "nr": (("sofs", "sofs", {}),
           ("pfenet", "pfenet+NR", {"test_path": "sliding", "nr": True, "dice": "mndl", "window": None}),
           ("hdmnet", "hdmnet+NR", {"nr": True})),
    "plain": (("sofs", "sofs", {}),
              ("pfenet", "pfenet", {"test_path": "resize"}),
              ("hdmnet", "hdmnet", {"nr": False})),
}


def method_episodes(n_episodes: int, runs: int, fold: int, shot: int):
    """The first ``n_episodes`` episodes of the synthetic FSS manifests of seeds 0 .. runs-1 (the
    repeated test runs of ``make bench RUNS=...``), decoded once."""
    from fdsbench import episodes as E
    from fdsbench.datasets.synthetic import Synthetic
    from fdsbench.loading import EpisodeLoader
    from fdsbench.registry import get_method

    ds = Synthetic()
    proto = E.protocol_for(ds, "fss", shot, fold)
    data = []
    for seed in range(runs):
        manifest = E.Manifest(E.generate(ds, fold, shot, seed, proto))
        loader = EpisodeLoader(ds, get_method("sofs"), manifest)
        for ep in manifest.episodes[:n_episodes]:
            data.append((loader.support(ep), [loader.query(q) for q in ep.queries]))
    return data, proto


def run_methods(rows, data, encoder: dict, cache: str, disk_dir):
    """One pass: each row's prepare/predict on every episode. ``cache``: off | per_method | shared."""
    import hashlib

    from fdsbench.blocks import features as FC
    from fdsbench.config import build_config
    from fdsbench.registry import get_method

    if cache == "off":
        FC.disable_shared()
    else:
        FC.enable_shared(disk_dir if cache == "shared" else None)
    counts, digests = [], []
    t0 = time.perf_counter()
    for name, label, over in rows:
        FC.shared_store().clear()  # memory emptied between methods (one process per method in make bench)
        cls = get_method(name)
        over = {**encoder, **{k: (data[0][0].crop_size if k == "window" and v is None else v) for k, v in over.items()}}
        m = cls(build_config(cls.Config, cls.presets, "test", over), device="cpu")
        for support, queries in data:
            state = m.prepare(support)
            digests += [hashlib.sha256(m.predict(state, q).tobytes()).hexdigest() for q in queries]
        st = m.model.feature_cache.stats()
        counts.append((label, st["forward_calls"], st["images"]))
    wall = time.perf_counter() - t0
    FC.disable_shared()
    return counts, digests, wall


def methods_main(args):
    n = args.episodes or 8
    encoder = {"backbone": "resnet18", "weights": "random", "layers": (2, 3), "merge_dim": args.merge_dim,
               "image_size": args.image_size}
    t0 = time.perf_counter()
    data, proto = method_episodes(n, args.runs, args.fold, args.shot)
    queries = [q.id for _, qs in data for q in qs]
    print(f"workload: the first {n} FSS episodes of each of {args.runs} synthetic manifests (fold {args.fold}, "
          f"{args.shot}-shot, seeds 0..{args.runs - 1}): {len(data)} episodes, {len(queries)} queries "
          f"({len(set(queries))} distinct), support crops {proto.get('crop_size')} px; "
          f"methods at their test presets on one encoder: resnet18 (random init) merged layer2+3 "
          f"({args.merge_dim} ch) at {args.image_size} px, cpu, torch threads {torch.get_num_threads()}; "
          f"setup {time.perf_counter() - t0:.1f}s")
    for key in [r.strip() for r in args.rows.split(",") if r.strip()]:
        rows = ROWS[key]
        disk = tempfile.mkdtemp(prefix="fdsbench-featcache-")
        passes = [("A no cache", *run_methods(rows, data, encoder, "off", None)),
                  ("B cache per method", *run_methods(rows, data, encoder, "per_method", None)),
                  ("C shared cache", *run_methods(rows, data, encoder, "shared", disk))]
        shutil.rmtree(disk, ignore_errors=True)
        labels = [label for _, label, _ in rows]
        print(f"\nrows '{key}': {', '.join(labels)}  (cells: backbone calls / images encoded)")
        print(f"{'pass':<20}" + "".join(f"{lab:>16}" for lab in labels) + f"{'total':>16}{'wall s':>9}")
        totals = {}
        for name, counts, _, wall in passes:
            calls, imgs = sum(c for _, c, _ in counts), sum(i for _, _, i in counts)
            totals[name[0]] = (calls, imgs)
            print(f"{name:<20}" + "".join(f"{f'{c} / {i}':>16}" for _, c, i in counts)
                  + f"{f'{calls} / {imgs}':>16}{wall:>9.1f}")
        (ac, ai), (bc, bi), (cc, ci) = totals["A"], totals["B"], totals["C"]
        print(f"ratio A/C (no cache / shared cache): backbone calls {ac / max(cc, 1):.2f}x, "
              f"images {ai / max(ci, 1):.2f}x; "
              f"B/C (cache per method / shared): calls {bc / max(cc, 1):.2f}x, images {bi / max(ci, 1):.2f}x")
        ref = passes[0][2]
        print(f"outputs (sha256 of {len(ref)} probability maps): B == A {passes[1][2] == ref}, "
              f"C == A {passes[2][2] == ref}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("methods", "encoder"), default="methods")
    ap.add_argument("--episodes", type=int, default=0, help="default: 8 per manifest (methods), 200 (encoder)")
    ap.add_argument("--runs", type=int, default=3, help="methods mode: manifests (test seeds) 0..runs-1")
    ap.add_argument("--rows", default="nr,plain", help="methods mode: comma list of nr, plain")
    ap.add_argument("--image-size", type=int, default=128, help="methods mode: model input side")
    ap.add_argument("--merge-dim", type=int, default=64, help="methods mode: channels of the merged layer2+3")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--layers", default=None, help="comma list; default layer2,layer3 (ResNet) / 5..10 (ViT)")
    ap.add_argument("--size", type=int, default=256, help="crop/window size (synthetic protocol: 256)")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--shot", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-bytes", type=float, default=4e9)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default; 1 is faster on a busy CPU)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "methods":
        return methods_main(args)
    args.episodes = args.episodes or 200
    if args.layers:
        layers = tuple(int(v) if v.lstrip("-").isdigit() else v for v in args.layers.split(","))
    else:
        layers = ("layer2", "layer3") if args.encoder.startswith("resnet") else (5, 6, 7, 8, 9, 10)

    t0 = time.perf_counter()
    eps, images, seeds, ds = build_workload(args.episodes, args.fold, args.shot, args.size)
    n_sup = sum(len(e.supports) for e in eps)
    print(f"workload: {len(eps)} FSS episodes of synthetic fold {args.fold}, {args.shot}-shot, manifest seeds "
          f"{seeds[0]}..{seeds[-1]} ({len(images)} distinct images, {n_sup} supports); encoder {args.encoder} "
          f"(random init) layers {layers} at {args.size}px on {args.device}, torch threads "
          f"{torch.get_num_threads()}; setup {time.perf_counter() - t0:.1f}s")

    bb = build_backbone(args.encoder, weights="random", seed=0, device=args.device)
    warm = episode_batches(eps[0], images, args.size)[0].to(args.device)
    bb.forward_features(warm, layers)  # warm-up (allocator, kernels), not counted

    cache = CachedBackbone(bb, max_bytes=int(args.max_bytes),
                           disk_dir=tempfile.mkdtemp(prefix="fdsbench-featcache-"))
    a, b = run_interleaved([lambda x: bb.forward_features(x, layers), lambda x: cache.forward_features(x, layers)],
                           eps, images, args.size, args.device, keep=3)
    sb = cache.stats()
    cache2 = CachedBackbone(bb, max_bytes=int(args.max_bytes), disk_dir=cache.store.disk_dir)
    (c,) = run_interleaved([lambda x: cache2.forward_features(x, layers)], eps, images, args.size, args.device)
    sc = cache2.stats()

    worst = max((fa - fb).abs().max().item() for ka, kb in zip(a["kept"], b["kept"]) for fa, fb in zip(ka, kb))
    print(f"check: max |A - B| over the first 3 episodes' features = {worst:.2e}")
    rows = [("A no cache", a["calls"], a["images"], a["encoder"], a["wall"]),
            ("B cache (memory)", sb["forward_calls"], sb["images"], b["encoder"], b["wall"]),
            ("C next run (disk)", sc["forward_calls"], sc["images"], c["encoder"], c["wall"])]
    print(f"{'pass':<19}{'backbone calls':>15}{'images encoded':>16}{'encoder s':>11}{'wall s':>9}")
    for name, calls, imgs, enc_s, wall in rows:
        print(f"{name:<19}{calls:>15}{imgs:>16}{enc_s:>11.2f}{wall:>9.2f}")
    print(f"B: {sb['hits']} memory hits of {b['calls']} requested batches, {sb['bytes'] / 2**20:.0f} MiB held; "
          f"C: {sc['disk_hits']} disk hits")
    print(f"ratio A/B (no cache / cache, same run): backbone calls {a['calls'] / max(sb['forward_calls'], 1):.2f}x, "
          f"images encoded {a['images'] / max(sb['images'], 1):.2f}x, encoder time {a['encoder'] / b['encoder']:.2f}x, "
          f"wall {a['wall'] / b['wall']:.2f}x")
    print(f"ratio A/C (no cache / next run from disk): encoder time {a['encoder'] / c['encoder']:.2f}x, "
          f"wall {a['wall'] / c['wall']:.2f}x")
    shutil.rmtree(cache.store.disk_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
