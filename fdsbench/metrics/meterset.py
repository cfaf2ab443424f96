"""MeterSet: the one object the runner feeds with (probability map, ground truth) per query.

State is a set of per-query rows (confusion counts, image score, region count) plus the pixel
scores (exact mode: float32 scores and the indices of the ground-truth pixels; binned mode: int64
histograms). Rows are keyed by (episode, query_id, class_key); merging is a disjoint union of rows
and a sum of histograms, and :meth:`compute` reads rows and pixel chunks in sorted key order, so the
result is bit-identical whatever the order of updates, the sharding over processes, or a resume
from ``state_dict`` — a key seen twice is an error (no silently double-counted queries, unlike
padded distributed samplers).

Probabilities are taken as given: values outside [0, 1] (or NaN) raise :class:`FdsError` unless
the meter was built with ``logits=True``, in which case ``sigmoid`` is applied explicitly and
``compute()["score_transform"] == "sigmoid"``. Binarisation is ``p > threshold`` (default 0.5).
Pixel scores are stored as float32 (exact mode is exact on these float32 values).

Image score (``image_score``): ``"max"`` (default), ``"mean"``, ``"area"`` (pixels with
p > threshold, the NBR+CaP rule) or ``"topK%"`` (mean of the top K percent of the map, at least
one pixel, e.g. ``"top1%"``). Connected ground-truth regions for AUPRO use 8-connectivity
(``connectivity=4`` for 4-connectivity).

See :mod:`fdsbench.metrics.segmentation` and :mod:`fdsbench.metrics.scores` for the definitions,
edge cases (``None`` where undefined) and the binned-mode error bounds.
"""
from __future__ import annotations

import math
import re

import numpy as np

from ..errors import FdsError
from .scores import BinnedScores, aupro_exact, auroc_exact, f1max_exact
from .segmentation import AREA_EDGES, RATIO_EDGES, confusion, segmentation_metrics

STATE_VERSION = 1
_ROW_INT = ("tp", "fp", "fn", "tn", "n_regions")
_TOPK = re.compile(r"^top(\d+(?:\.\d+)?)%$")


def _to_numpy(x, what: str, qid: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor on any device
        x = x.detach()
        if getattr(x, "dtype", None) is not None and str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise FdsError(f"query '{qid}': {what} is not an array ({type(x).__name__}); pass a numpy "
                       f"array or torch tensor") from e


def _image_score_fn(spec: str):
    if spec == "max":
        return lambda p, pred: float(p.max())
    if spec == "mean":
        return lambda p, pred: float(p.mean(dtype=np.float64))
    if spec == "area":
        return lambda p, pred: float(np.count_nonzero(pred))
    m = _TOPK.match(spec)
    if m:
        frac = float(m.group(1)) / 100.0
        if not 0 < frac <= 1:
            raise FdsError(f"image_score '{spec}': K must be in (0, 100]")

        def topk(p, pred):
            flat = p.ravel()
            k = max(1, int(math.ceil(frac * flat.size)))
            part = np.partition(flat, flat.size - k)[flat.size - k:]
            return float(np.sort(part.astype(np.float64)).mean())
        return topk
    raise FdsError(f"unknown image_score '{spec}'; use max, mean, area or topK% (e.g. top1%)")


class MeterSet:
    """Segmentation + score meters with mergeable state. See the module docstring.

    ``compute()`` keys (fractions in [0, 1]; ``None`` where undefined):

    * ``miou`` (mean over classes of pooled I/U), ``per_class`` {class: iou, intersection, union,
      episodes, images, defective_images, per_image_iou, per_image_dice, image_auroc},
      ``n_classes``, ``fbiou`` (pooled fg/bg), ``fbiou_classmean``, ``iou_fg``, ``iou_bg``,
      ``episode_miou`` (mean of per-episode IoU, its own name);
    * ``per_image_iou`` / ``per_image_dice``: mean over queries with a NON-EMPTY ground truth
      (NBR+CaP protocol; normal queries are excluded, ``n_defective_images`` counts the others);
      ``per_image_iou_all`` / ``per_image_dice_all``: mean over all queries where an EMPTY UNION
      (empty GT, empty prediction) scores 1.0 and an empty GT with a false positive scores 0.0;
    * ``image_acc_area`` / ``image_auroc_area``: detection by predicted area (NBR+CaP §IV-G);
    * ``by_size`` {"area_ratio": {"<0.3%", "0.3%-2%", ">=2%"}, "area_px": {"<900px",
      "900px-8100px", ">=8100px"}} each {images, iou (pooled), per_image_iou, per_image_dice};
    * ``image_auroc`` (image score per ``image_score``; None unless both normal and defective
      queries exist), ``image_auroc_classmean``, ``n_normal_images``;
    * ``pixel_auroc``, ``pixel_f1_max``, ``pixel_f1_threshold``, ``aupro`` (to ``fpr_limit``,
      normalised) and their ``*_error_bound`` (0 in exact mode), ``bins`` in binned mode;
    * with ``per_class_scores=True``: ``per_class[c]`` also holds ``pixel_auroc``,
      ``pixel_f1_max``, ``aupro`` of that class alone, and ``pixel_auroc_classmean``,
      ``pixel_f1_max_classmean``, ``aupro_classmean`` average them (the per-category mean the
      anomaly-detection papers report; binned mode then keeps one histogram set per class);
    * ``threshold``, ``score_mode``, ``image_score``, ``score_transform``, ``fpr_limit``,
      ``n_queries``, ``n_episodes`` (distinct (episode, class) pairs), ``n_pixels``.
    """

    def __init__(self, threshold: float = 0.5, score_mode: str = "exact", image_score: str = "max",
                 logits: bool = False, bins: int = 10000, fpr_limit: float = 0.3,
                 connectivity: int = 8, ratio_edges=RATIO_EDGES, area_edges=AREA_EDGES,
                 per_class_scores: bool = False):
        if score_mode not in ("exact", "binned", "off"):
            raise FdsError(f"unknown score_mode '{score_mode}'; use exact, binned or off")
        if connectivity not in (4, 8):
            raise FdsError(f"connectivity must be 4 or 8, not {connectivity}")
        if not 0 < float(fpr_limit) <= 1:
            raise FdsError(f"fpr_limit must be in (0, 1], not {fpr_limit}")
        if not 0 <= float(threshold) <= 1:
            raise FdsError(f"threshold must be in [0, 1] (probabilities), not {threshold}")
        self.config = {
            "threshold": float(threshold), "score_mode": score_mode, "image_score": image_score,
            "logits": bool(logits), "bins": int(bins), "fpr_limit": float(fpr_limit),
            "connectivity": int(connectivity), "ratio_edges": [float(v) for v in ratio_edges],
            "area_edges": [float(v) for v in area_edges],
            "per_class_scores": bool(per_class_scores),
        }
        self._score_fn = _image_score_fn(image_score)
        self._rows: dict[tuple, dict] = {}
        self._chunks: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._binned = BinnedScores(bins) if score_mode == "binned" else None
        self._binned_pc: dict[str, BinnedScores] = {}  # per class, with per_class_scores

    # ---- feeding -------------------------------------------------------------------------------
    def update(self, prob, gt, class_key: str, episode: int, query_id: str) -> None:
        """Add one query: ``prob`` float [H, W] in [0, 1] (numpy or torch), ``gt`` bool [H, W]."""
        qid = str(query_id)
        key = (int(episode), qid, str(class_key))
        if key in self._rows:
            raise FdsError(f"query '{qid}' of episode {episode} ({class_key}) was scored twice; "
                           f"each (episode, query) may be updated once")
        p = _to_numpy(prob, "prob", qid)
        g = _to_numpy(gt, "gt", qid)
        if p.ndim != 2 or p.shape != g.shape:
            raise FdsError(f"query '{qid}': prediction shape {tuple(p.shape)} != ground-truth shape "
                           f"{tuple(g.shape)}; predict() must return a [H, W] map at the query's "
                           f"original size")
        if p.size == 0:
            raise FdsError(f"query '{qid}': empty prediction map")
        if not np.issubdtype(p.dtype, np.floating):
            raise FdsError(f"query '{qid}': prediction dtype {p.dtype} is not floating point; return "
                           f"probabilities in [0, 1]")
        if g.dtype != np.bool_:
            if not (np.issubdtype(g.dtype, np.integer) or np.issubdtype(g.dtype, np.floating)) or \
                    not np.isin(g, (0, 1)).all():
                raise FdsError(f"query '{qid}': ground truth must be bool (or 0/1), got dtype "
                               f"{g.dtype}; binarise the mask before scoring")
            g = g.astype(bool)
        p = p.astype(np.float64, copy=False) if p.dtype != np.float32 else p
        if self.config["logits"]:
            if not np.isfinite(p).all():
                raise FdsError(f"query '{qid}': logits contain NaN or inf")
            with np.errstate(over="ignore"):  # exp overflow -> sigmoid 0, as it should
                p = 1.0 / (1.0 + np.exp(-p.astype(np.float64)))
        else:
            lo, hi = float(np.min(p)), float(np.max(p))
            if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
                raise FdsError(f"query '{qid}': prediction values in [{lo}, {hi}] are outside [0, 1]; "
                               f"return probabilities, or declare logits=True to apply a sigmoid")
        pred = p > self.config["threshold"]
        tp, fp, fn, tn = confusion(pred, g)
        if self.config["image_score"] == "max" and not self.config["logits"]:
            img_score = hi
        else:
            img_score = self._score_fn(p, pred)
        row = {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "image_score": float(img_score),
               "n_regions": 0}
        mode = self.config["score_mode"]
        if mode != "off":
            lab = g.ravel()
            if tp + fn:
                from scipy import ndimage
                st = np.ones((3, 3), bool) if self.config["connectivity"] == 8 else None
                rows_ = np.flatnonzero(g.any(axis=1))
                cols_ = np.flatnonzero(g.any(axis=0))
                # label inside the GT bounding box only: positives keep their row-major order
                sub = g[rows_[0]:rows_[-1] + 1, cols_[0]:cols_[-1] + 1]
                regions, R = ndimage.label(sub, structure=st)
                reg = regions[sub].astype(np.int64) - 1  # region of each positive, in order
                sizes = np.bincount(reg, minlength=R)
            else:
                R, reg, sizes = 0, np.zeros(0, np.int64), np.zeros(0, np.int64)
            row["n_regions"] = int(R)
            if mode == "exact":
                scores = p.astype(np.float32).ravel()  # always a copy we own
                pos_idx = np.flatnonzero(lab).astype(np.int32)  # images < 2**31 pixels
                self._chunks[key] = (scores, pos_idx, sizes[reg].astype(np.int32))
            else:
                self._binned.update(p.ravel(), lab, reg, sizes)
                if self.config["per_class_scores"]:
                    self._binned_pc.setdefault(key[2], BinnedScores(self.config["bins"])).update(
                        p.ravel(), lab, reg, sizes)
        self._rows[key] = row

    # ---- state ---------------------------------------------------------------------------------
    def _sorted_keys(self):
        return sorted(self._rows)

    def _columns(self, keys) -> dict:
        rows = {"episode": np.array([k[0] for k in keys], np.int64),
                "query_id": [k[1] for k in keys], "class_key": [k[2] for k in keys],
                "image_score": np.array([self._rows[k]["image_score"] for k in keys], np.float64)}
        for c in _ROW_INT:
            rows[c] = np.array([self._rows[k][c] for k in keys], np.int64)
        return rows

    def state_dict(self) -> dict:
        """Plain, picklable dict (numpy arrays, Python scalars, lists), rows in sorted key order."""
        keys = self._sorted_keys()
        rows = self._columns(keys)
        state = {"version": STATE_VERSION, "config": dict(self.config), "rows": rows, "pixels": None}
        if self.config["score_mode"] == "exact":
            ch = [self._chunks[k] for k in keys]
            state["pixels"] = {
                "scores": np.concatenate([c[0] for c in ch]) if ch else np.zeros(0, np.float32),
                "offsets": np.cumsum([0] + [c[0].size for c in ch]).astype(np.int64),
                "pos_idx": np.concatenate([c[1] for c in ch]) if ch else np.zeros(0, np.int32),
                "pos_region_size": np.concatenate([c[2] for c in ch]) if ch else np.zeros(0, np.int32),
                "pos_offsets": np.cumsum([0] + [c[1].size for c in ch]).astype(np.int64),
            }
        elif self.config["score_mode"] == "binned":
            state["pixels"] = self._binned.state_dict()
            if self.config["per_class_scores"]:
                state["pixels_per_class"] = {c: self._binned_pc[c].state_dict()
                                             for c in sorted(self._binned_pc)}
        return state

    def _check_config(self, cfg: dict, what: str) -> None:
        mine = {k: v for k, v in self.config.items()}
        theirs = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.items()}
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise FdsError(f"cannot {what}: meter configs differ in {', '.join(diff)}; build both "
                           f"MeterSets with the same options")

    def load_state_dict(self, state: dict) -> None:
        """Replace this meter's state by ``state`` (configs must match)."""
        if state.get("version") != STATE_VERSION:
            raise FdsError(f"meter state version {state.get('version')} is not {STATE_VERSION}; "
                           f"recompute the run with this fdsbench version")
        self._check_config(state["config"], "load meter state")
        r = state["rows"]
        keys = list(zip((int(e) for e in r["episode"]), r["query_id"], r["class_key"]))
        self._rows = {}
        for i, k in enumerate(keys):
            row = {c: int(r[c][i]) for c in _ROW_INT}
            row["image_score"] = float(r["image_score"][i])
            self._rows[k] = row
        self._chunks = {}
        px = state["pixels"]
        if self.config["score_mode"] == "exact":
            off, poff = px["offsets"], px["pos_offsets"]
            for i, k in enumerate(keys):
                self._chunks[k] = (px["scores"][off[i]:off[i + 1]].copy(),
                                   px["pos_idx"][poff[i]:poff[i + 1]].copy(),
                                   px["pos_region_size"][poff[i]:poff[i + 1]].copy())
        elif self.config["score_mode"] == "binned":
            self._binned = BinnedScores(self.config["bins"])
            self._binned.load_state_dict(px)
            self._binned_pc = {}
            for c, st in state.get("pixels_per_class", {}).items():
                self._binned_pc[c] = BinnedScores(self.config["bins"])
                self._binned_pc[c].load_state_dict(st)

    def merge(self, other: "MeterSet") -> "MeterSet":
        """Add ``other``'s queries to this meter (disjoint keys required). Returns ``self``."""
        self._check_config(other.config, "merge meters")
        dup = set(self._rows) & set(other._rows)
        if dup:
            e, q, c = sorted(dup)[0]
            raise FdsError(f"cannot merge meters: query '{q}' of episode {e} ({c}) is in both "
                           f"({len(dup)} duplicates); shards must hold disjoint queries")
        self._rows.update({k: dict(v) for k, v in other._rows.items()})
        if self.config["score_mode"] == "exact":
            self._chunks.update(other._chunks)
        elif self.config["score_mode"] == "binned":
            self._binned.merge(other._binned)
            for c, b in other._binned_pc.items():
                if c not in self._binned_pc:
                    self._binned_pc[c] = BinnedScores(self.config["bins"])
                self._binned_pc[c].merge(b)
        return self

    def __len__(self) -> int:
        return len(self._rows)

    # ---- results -------------------------------------------------------------------------------
    def compute(self) -> dict:
        """All metrics as a JSON-able dict (fractions in [0, 1]; ``None`` where undefined)."""
        cfg = self.config
        keys = self._sorted_keys()
        r = self._columns(keys)
        out = segmentation_metrics(r, cfg["ratio_edges"], cfg["area_edges"])
        out["threshold"] = cfg["threshold"]
        out["score_mode"] = cfg["score_mode"]
        out["image_score"] = cfg["image_score"]
        out["score_transform"] = "sigmoid" if cfg["logits"] else "none"
        out["fpr_limit"] = cfg["fpr_limit"]
        # image level
        s = r["image_score"]
        lab = (r["tp"] + r["fn"]) > 0
        out["image_auroc"] = auroc_exact(s[lab], s[~lab])
        out["n_normal_images"] = int((~lab).sum())
        ck = np.asarray(r["class_key"], dtype=object)
        cls_auroc = []
        for c, d in out["per_class"].items():
            m = ck == c
            a = auroc_exact(s[m & lab], s[m & ~lab])
            d["image_auroc"] = a
            if a is not None:
                cls_auroc.append(a)
        out["image_auroc_classmean"] = float(np.mean(cls_auroc)) if cls_auroc else None
        # pixel level
        names = ("pixel_auroc", "pixel_f1_max", "pixel_f1_threshold", "aupro")
        if cfg["score_mode"] == "off":
            out.update({k: None for k in names})
        elif cfg["score_mode"] == "binned":
            out.update(self._binned.compute(cfg["fpr_limit"]))
            out["bins"] = cfg["bins"]
        else:
            out.update(_exact_pixel_metrics([self._chunks[k] for k in keys], int(r["n_regions"].sum()),
                                            cfg["fpr_limit"]))
        if cfg["per_class_scores"] and cfg["score_mode"] != "off":
            nreg = {}
            for c, n in zip(r["class_key"], r["n_regions"].tolist()):
                nreg[c] = nreg.get(c, 0) + n
            for c, d in out["per_class"].items():
                if cfg["score_mode"] == "binned":
                    pc = self._binned_pc[c].compute(cfg["fpr_limit"])
                else:
                    pc = _exact_pixel_metrics([self._chunks[k] for k in keys if k[2] == c],
                                              nreg[c], cfg["fpr_limit"])
                d.update({k: pc[k] for k in ("pixel_auroc", "pixel_f1_max", "aupro")})
            for k in ("pixel_auroc", "pixel_f1_max", "aupro"):
                v = [d[k] for d in out["per_class"].values() if d[k] is not None]
                out[k + "_classmean"] = float(np.mean(v)) if v else None
        out["n_pixels"] = int((r["tp"] + r["fp"] + r["fn"] + r["tn"]).sum())
        return out


def _exact_pixel_metrics(chunks, n_regions: int, fpr_limit: float) -> dict:
    """Exact pixel metrics from per-query chunks (scores, positive indices, their region sizes)
    in canonical order. Peak memory: the stored scores plus one float32 copy of the negatives
    (sorted in place) and the positives."""
    n_tot = sum(c[0].size for c in chunks)
    n_pos = sum(c[1].size for c in chunks)
    neg = np.empty(n_tot - n_pos, np.float32)
    pos = np.empty(n_pos, np.float32)
    size = np.empty(n_pos, np.float64)
    o = op = 0
    for sc, pi, ps in chunks:
        k = pi.size
        if k:
            keep = np.ones(sc.size, bool)
            keep[pi] = False
            neg[o:o + sc.size - k] = sc[keep]
            pos[op:op + k] = sc[pi]
            size[op:op + k] = ps
        else:
            neg[o:o + sc.size] = sc
        o += sc.size - k
        op += k
    neg.sort()
    order = np.argsort(pos, kind="stable")  # sorted needles make searchsorted cache-friendly
    pos, size = pos[order], size[order]
    f1, t = f1max_exact(pos, neg, neg_sorted=True)
    out = {
        "pixel_auroc": auroc_exact(pos, neg, neg_sorted=True),
        "pixel_f1_max": f1, "pixel_f1_threshold": t,
        "aupro": aupro_exact(pos, 1.0 / np.maximum(size, 1.0), neg, n_regions, fpr_limit,
                             neg_sorted=True),
    }
    for k in ("pixel_auroc", "pixel_f1_max", "aupro"):  # exact: no binning error
        out[k + "_error_bound"] = None if out[k] is None else 0.0
    return out
