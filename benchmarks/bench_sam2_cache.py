"""Per-query time of the SAM2 video-track cached path vs the official predictor path.

Ours (fdsbench method ``sam2``): ``prepare`` encodes the support frame and its mask memory once,
then each query runs only image encoder + memory attention + decoder (the
low-level recipe). Official: a fresh two-frame ``SAM2VideoPredictor`` state per query over a folder of
JPEG frames (init_state → add_new_mask → propagate_in_video), i.e. what a script built on the
predictor does per episode. Both run the same weights (random init, object score forced positive so
the decoder path is realistic) on the same decoded frames; the script also reports the largest
logit difference between the two (it must be ~0).

    .venv/bin/python benchmarks/bench_sam2_cache.py                 # SAM2-s at S=256, CPU
    .venv/bin/python benchmarks/bench_sam2_cache.py --model t --queries 8 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fdsbench.methods.sam2 import Sam2VideoTrack
from fdsbench.methods.sam2 import official as O
from fdsbench.methods.sam2 import reference as R
from fdsbench.types import Shot, SupportSet


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="s", help="t | s | b+ | l (default s: the paper's S=256 row)")
    ap.add_argument("--size", type=int, default=256, help="S (default 256)")
    ap.add_argument("--queries", type=int, default=5, help="timed queries per path")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device

    torch.manual_seed(0)
    ours = Sam2VideoTrack.from_preset("test", {"model": args.model, "image_size": args.size, "amp": "fp32"},
                                      device=dev)
    ours.model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.data.fill_(10.0)
    off = O.build_predictor(args.model, args.size, device=dev)
    off.load_state_dict(ours.model.state_dict(), strict=True)

    rng = np.random.default_rng(0)
    n = args.warmup + args.queries
    yy, xx = np.mgrid[0:256, 0:256]
    imgs = [np.clip(rng.integers(0, 255, (256, 256, 3)) * 0.4 + 80 * np.sin((xx + 5 * i) / 11.0)[..., None] + 100,
                    0, 255).astype(np.uint8) for i in range(n + 1)]
    mask = (yy - 128) ** 2 + (xx - 120) ** 2 < 28 ** 2

    with tempfile.TemporaryDirectory() as tmp:
        folders, pixels = [], []
        for i in range(n):  # one 2-frame video (support, query i) per query, written before timing
            paths = R.write_frames(Path(tmp) / f"v{i}", [imgs[0], imgs[i + 1]])
            folders.append(Path(tmp) / f"v{i}")
            pixels.append(R.read_frames(paths))
        support_px = pixels[0][0]

        # ours: prepare once; then, interleaved per query (so both paths see the same machine
        # load), our query against the cached memory and a fresh official two-frame state
        support = SupportSet("bench/defect", [Shot("s", support_px, mask)], seed=0)
        ours.prepare(support)  # warm-up (first call allocates)
        _sync(dev)
        t, c = time.perf_counter(), time.process_time()
        state = ours.prepare(support)
        _sync(dev)
        t_prepare, c_prepare = time.perf_counter() - t, time.process_time() - c
        ours_t, off_t, ours_c, off_c, diffs = [], [], [], [], []
        for i in range(n):
            _sync(dev)
            t, c = time.perf_counter(), time.process_time()
            low = ours.query_logits(state, pixels[i][1])
            _sync(dev)
            t1, c1 = time.perf_counter(), time.process_time()
            ref = R.official_video_logits(off, folders[i], [mask])
            _sync(dev)
            t2, c2 = time.perf_counter(), time.process_time()
            if i >= args.warmup:
                ours_t.append(t1 - t)
                off_t.append(t2 - t1)
                ours_c.append(c1 - c)
                off_c.append(c2 - c1)
            got = O.logits_to_size(low, (256, 256))
            diffs.append((ref.to(got.device) - got).abs().max().item())

    q_ours, q_off = statistics.median(ours_t), statistics.median(off_t)
    amort = (t_prepare + sum(ours_t)) / len(ours_t)
    cq_ours, cq_off = statistics.median(ours_c), statistics.median(off_c)
    print(f"SAM2-{args.model} S={args.size} device={dev} threads={torch.get_num_threads()} fp32 "
          f"random weights, {args.queries} timed queries (+{args.warmup} warm-up), sam2 {O.sam2_version()}")
    print(f"  ours     cached memory : {q_ours * 1000:8.1f} ms/query (median)   support prepare once: "
          f"{t_prepare * 1000:.1f} ms")
    print(f"  official fresh 2-frame : {q_off * 1000:8.1f} ms/query (median)")
    print(f"  speed-up (official / ours, per query): {q_off / q_ours:.2f}x   "
          f"(prepare amortised over {args.queries} queries: {q_off / amort:.2f}x)")
    print(f"  CPU time (process, all threads): ours {cq_ours * 1000:.1f} ms/query, official {cq_off * 1000:.1f} "
          f"ms/query, ratio {cq_off / cq_ours:.2f}x (prepare {c_prepare * 1000:.1f} ms; robust to a busy machine)")
    print(f"  max |logit diff| ours vs official: {max(diffs):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
