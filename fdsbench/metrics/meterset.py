"""MeterSet: the one object the runner feeds with (probability map, ground truth) per query.

State is a set of per-query rows (confusion counts, image score, region count) plus the pixel
scores (exact mode: float32 scores and the indices of the ground-truth pixels; binned mode: int64
histograms). Rows are keyed by (episode, query_id, class_key); merging is a disjoint union of rows
and a sum of histograms, and :meth:`compute` reads rows and pixel chunks in sorted key order, so the
result is bit-identical whatever the order of updates, the sharding over processes, or a resume
from ``state_dict`` — a key seen twice is an error (no silently double-counted queries, unlike
padded distributed samplers).

Probabilities are taken as given: values outside [0, 1] (or NaN) raise :class:`FdsError` unless
the meter was built with ``logits=True``: the maps are then logits, binarised at
``logit(threshold)`` and ranked as they are (a sigmoid is monotone, and one stored in float32 would
tie every logit above ~17), with ``compute()["score_transform"] == "sigmoid"`` and the F1 threshold
reported as a probability. Binarisation is ``p > threshold`` (default 0.5). Exact mode stores
float32 maps as float32 and wider maps as float64, so it is exact for either.

Image score (``image_score``): ``"max"`` (default), ``"mean"``, ``"area"`` (pixels with
p > threshold, the NBR+CaP rule) or ``"topK%"`` (mean of the top K percent of the map, at least
one pixel, e.g. ``"top1%"``). Connected ground-truth regions for AUPRO use 8-connectivity
(``connectivity=4`` for 4-connectivity).

See :mod:`fdsbench.metrics.segmentation` and :mod:`fdsbench.metrics.scores` for the definitions,
edge cases (``None`` where undefined) and the binned-mode error bounds.
"""
from __future__ import annotations

import math
import os
import re
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from ..errors import FdsError
from ..timing import background_priority
from .scores import BinnedScores, ScoreBuffer, SortedNegatives, aupro_exact, auroc_exact, f1max_exact
from .segmentation import AREA_EDGES, RATIO_EDGES, segmentation_metrics

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


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function in float64 (exp overflow gives 0, as it should)."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


SPLIT_PIXELS = 1 << 19
"""Maps of this many pixels and more are scored in two halves on two threads (numpy releases the
GIL): the counts and histograms of the halves add up exactly, so the numbers do not change."""


_HELPERS: dict[int, ThreadPoolExecutor] = {}


def _helper() -> ThreadPoolExecutor:
    """This process's helper thread (a forked child gets its own: threads do not survive a fork)."""
    pid = os.getpid()
    if pid not in _HELPERS:
        _HELPERS[pid] = ThreadPoolExecutor(1, thread_name_prefix="fdsbench-meter", initializer=background_priority)
    return _HELPERS[pid]


def _in_halves(fn, n: int) -> list:
    """``[fn(0, n)]``, or for large maps ``[fn(0, n // 2), fn(n // 2, n)]`` with the first half on a
    helper thread while this thread does the second."""
    if n < SPLIT_PIXELS:
        return [fn(0, n)]
    first = _helper().submit(fn, 0, n // 2)
    second = fn(n // 2, n)
    return [first.result(), second]


_REGIONS: dict[tuple[int, int], tuple] = {}


def _immutable(a) -> bool:
    """Whether no one can change ``a``'s pixels: read-only down to an owner that is read-only too."""
    while isinstance(a, np.ndarray):
        if a.flags.writeable:
            return False
        a = a.base
    return a is None or isinstance(a, bytes)


def ground_truth_pixels(g: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices of the ground-truth pixels in row-major order, the connected region of each,
    the pixel count of each region) of a bool mask. An immutable mask (a shared decoded mask) is
    labelled once while it lives, whichever thread asks first (the loader labels queries ahead)."""
    key = (id(g), connectivity)
    hit = _REGIONS.get(key)
    if hit is not None and hit[0]() is g:
        return hit[1]
    pos_idx = np.flatnonzero(g)
    if pos_idx.size:
        st = np.ones((3, 3), bool) if connectivity == 8 else None
        rows_ = np.flatnonzero(g.any(axis=1))
        cols_ = np.flatnonzero(g.any(axis=0))
        # label inside the GT bounding box only: positives keep their row-major order
        sub = g[rows_[0]:rows_[-1] + 1, cols_[0]:cols_[-1] + 1]
        regions, R = ndimage.label(sub, structure=st)
        reg = regions[sub].astype(np.int64) - 1
        sizes = np.bincount(reg, minlength=R)
    else:
        reg, sizes = np.zeros(0, np.int64), np.zeros(0, np.int64)
    out = (pos_idx, reg, sizes)
    if _immutable(g):
        for a in out:
            a.setflags(write=False)
        _REGIONS[key] = (weakref.ref(g, lambda _, k=key: _REGIONS.pop(k, None)), out)
    return out


def _image_score_fn(spec: str):
    if spec == "max":
        return lambda p, n_pred: float(p.max())
    if spec == "mean":
        return lambda p, n_pred: float(p.mean(dtype=np.float64))
    if spec == "area":
        return lambda p, n_pred: float(n_pred)
    m = _TOPK.match(spec)
    if m:
        frac = float(m.group(1)) / 100.0
        if not 0 < frac <= 1:
            raise FdsError(f"image_score '{spec}': K must be in (0, 100]")

        def topk(p, n_pred):
            flat = p.ravel()
            k = max(1, int(math.ceil(frac * flat.size)))
            part = np.partition(flat, flat.size - k)[flat.size - k:]
            return float(np.sort(part.astype(np.float64)).mean())
        return topk
    raise FdsError(f"unknown image_score '{spec}'; use max, mean, area or topK% (e.g. top1%)")


class Measured(NamedTuple):
    """One query as :meth:`MeterSet.measure` gives it: its row (confusion counts, image score,
    region count) and its pixel scores (exact: the flattened map itself, the indices of its positives
    and their region sizes;
    binned: the histogram, positives' bins, their regions and the region sizes)."""
    row: dict
    pixels: tuple | None


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
        # exact mode: every query's scores in one buffer; per key (start, size, positives' indices,
        # their region sizes)
        self._scores = ScoreBuffer()
        self._chunks: dict[tuple, tuple[int, int, np.ndarray, np.ndarray]] = {}
        self._spent = False
        self._binned = BinnedScores(bins) if score_mode == "binned" else None
        self._binned_pc: dict[str, BinnedScores] = {}  # per class, with per_class_scores

    # ---- feeding -------------------------------------------------------------------------------
    def update(self, prob, gt, class_key: str, episode: int, query_id: str,
               value_range: tuple[float, float] | None = None) -> None:
        """Add one query: ``prob`` float [H, W] in [0, 1] (numpy or torch), ``gt`` bool [H, W].
        ``value_range``: the (min, max) of ``prob`` where the caller has computed it already."""
        self._check_new(self._key(episode, query_id, class_key))
        self.add(self.measure(prob, gt, query_id, value_range), class_key, episode, query_id)

    @staticmethod
    def _key(episode: int, query_id: str, class_key: str) -> tuple:
        return int(episode), str(query_id), str(class_key)

    def _check_new(self, key: tuple) -> None:
        self._check_live()
        if key in self._rows:
            raise FdsError(f"query '{key[1]}' of episode {key[0]} ({key[2]}) was scored twice; "
                           f"each (episode, query) may be updated once")

    def measure(self, prob, gt, query_id: str, value_range: tuple[float, float] | None = None,
                split: bool = True) -> "Measured":
        """What :meth:`update` takes from one map, without changing the meters: safe to call on
        several threads at once (the runner measures queries in parallel and adds them in order).
        Exact mode refers to the map itself until :meth:`add` copies its scores: it must not
        change in between. ``split``: score a large map in two halves on two threads."""
        qid = str(query_id)
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
        th, logits, mode = self.config["threshold"], self.config["logits"], self.config["score_mode"]
        if logits:
            # rank on the logits themselves: a sigmoid stored in float32 saturates to 1.0 above ~17
            # and would tie every high score; thresholds map through logit(t)
            if not np.isfinite(p).all():
                raise FdsError(f"query '{qid}': logits contain NaN or inf")
            cut = np.inf if th >= 1 else -np.inf if th <= 0 else np.log(th / (1.0 - th))
            hi = float(np.max(p))  # the image score "max" ranks as the max of the sigmoid
        else:
            lo, hi = value_range or (float(np.min(p)), float(np.max(p)))
            if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
                raise FdsError(f"query '{qid}': prediction values in [{lo}, {hi}] are outside [0, 1]; "
                               f"return probabilities, or declare logits=True to apply a sigmoid")
            cut = th
        pos_idx, reg, sizes = ground_truth_pixels(g, self.config["connectivity"])
        flat = p.ravel()
        # float32 maps are stored as float32, anything wider as float64: no two scores that differ in
        # the input are tied in storage, so exact mode is exact (error bound 0)

        def part(a: int, b: int):
            """Pixels a..b-1: (predicted positive, true positive) counts, and the binned histogram."""
            seg = flat[a:b]
            i0, i1 = np.searchsorted(pos_idx, (a, b))
            local = pos_idx[i0:i1] - a
            above = seg > cut
            counts = int(np.count_nonzero(above)), int(np.count_nonzero(above[local]))
            if mode == "binned":  # bins live in [0, 1]
                return counts, BinnedScores.histogram(_sigmoid(seg) if logits else seg, local, self.config["bins"])
            return counts, None

        parts = _in_halves(part, flat.size) if split else [part(0, flat.size)]
        n_pred, tp = (sum(c[i] for c, _ in parts) for i in (0, 1))
        if self.config["image_score"] == "max":
            img_score = hi
        else:
            img_score = self._score_fn(_sigmoid(p) if logits else p, n_pred)
        P = int(pos_idx.size)
        row = {"tp": tp, "fp": n_pred - tp, "fn": P - tp, "tn": g.size - n_pred - P + tp,
               "image_score": float(img_score), "n_regions": 0 if mode == "off" else int(sizes.size)}
        if mode == "exact":
            return Measured(row, (flat, pos_idx.astype(np.int32), sizes[reg].astype(np.int32)))  # < 2**31 px
        if mode == "binned":
            hist = sum(h for _, (h, _) in parts)
            return Measured(row, (hist, np.concatenate([pb for _, (_, pb) in parts]), reg, sizes))
        return Measured(row, None)

    def add(self, m: "Measured", class_key: str, episode: int, query_id: str) -> None:
        """Add a query measured by :meth:`measure` (with this meter's configuration)."""
        key = self._key(episode, query_id, class_key)
        self._check_new(key)
        if self.config["score_mode"] == "exact":
            scores, pos_idx, pos_size = m.pixels
            self._chunks[key] = (self._scores.append(scores), scores.size, pos_idx, pos_size)
        elif self.config["score_mode"] == "binned":
            self._binned.add(*m.pixels)
            if self.config["per_class_scores"]:
                self._binned_pc.setdefault(key[2], BinnedScores(self.config["bins"])).add(*m.pixels)
        self._rows[key] = m.row

    def reserve(self, pixels: int) -> None:
        """Exact mode: room for ``pixels`` more pixel scores, written later by :meth:`add` (the
        buffer is then never regrown and copied; room that stays unused is never touched)."""
        self._check_live()
        if self.config["score_mode"] == "exact":
            self._scores.reserve(int(pixels))

    def _check_live(self) -> None:
        if self._spent:
            raise FdsError("this meter's scores were sorted in place by compute(consume=True); it cannot "
                           "be updated, saved, merged or computed again")

    def prepare_gt(self, gt: np.ndarray) -> None:
        """Label the regions of a shared (read-only) ground-truth mask now, e.g. on a loading
        thread, so that :meth:`update` finds them done."""
        ground_truth_pixels(gt, self.config["connectivity"])

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

    def keys(self) -> list[tuple]:
        """The (episode, query_id, class_key) of every scored query, sorted."""
        return self._sorted_keys()

    def state_dict(self, keys=None, pixels: bool = True) -> dict:
        """Plain dict (numpy arrays, Python scalars, lists), rows in sorted key order.

        ``keys``: only these rows (and, in exact mode, their pixel chunks) — an increment for an
        append-only checkpoint; ``pixels=False`` leaves out the binned histograms (constant in
        size, saved whole apart). :func:`state_to_arrays` flattens it for a pickle-free ``.npz``."""
        self._check_live()
        keys = self._sorted_keys() if keys is None else sorted(keys)
        rows = self._columns(keys)
        state = {"version": STATE_VERSION, "config": dict(self.config), "rows": rows, "pixels": None}
        if self.config["score_mode"] == "exact":
            ch = [self._chunks[k] for k in keys]
            stored = self._scores.stored()
            state["pixels"] = {
                "scores": np.concatenate([stored[a:a + n] for a, n, _, _ in ch]) if ch else np.zeros(0, np.float32),
                "offsets": np.cumsum([0] + [n for _, n, _, _ in ch]).astype(np.int64),
                "pos_idx": np.concatenate([c[2] for c in ch]) if ch else np.zeros(0, np.int32),
                "pos_region_size": np.concatenate([c[3] for c in ch]) if ch else np.zeros(0, np.int32),
                "pos_offsets": np.cumsum([0] + [c[2].size for c in ch]).astype(np.int64),
            }
        elif self.config["score_mode"] == "binned" and pixels:
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
        """Replace this meter's state by ``state`` (configs must match). The state is checked for
        consistency first (a damaged or edited checkpoint raises :class:`FdsError`, never loads)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise FdsError(f"meter state version {state.get('version') if isinstance(state, dict) else None} "
                           f"is not {STATE_VERSION}; recompute the run with this fdsbench version")
        self._check_config(state.get("config") or {}, "load meter state")
        r, px = state.get("rows"), state.get("pixels")
        keys = _check_rows(r)
        rows = {}
        for i, k in enumerate(keys):
            row = {c: int(r[c][i]) for c in _ROW_INT}
            row["image_score"] = float(r["image_score"][i])
            rows[k] = row
        chunks = {}
        buffer = ScoreBuffer()
        binned, binned_pc = None, {}
        if self.config["score_mode"] == "exact":
            _check_exact_pixels(px, r, self.config["logits"])
            off, poff = np.asarray(px["offsets"], np.int64).tolist(), px["pos_offsets"]
            buffer.append(np.asarray(px["scores"]))  # float32, or float64 input kept
            for i, k in enumerate(keys):
                chunks[k] = (off[i], off[i + 1] - off[i],
                             np.asarray(px["pos_idx"][poff[i]:poff[i + 1]], np.int32).copy(),
                             np.asarray(px["pos_region_size"][poff[i]:poff[i + 1]], np.int32).copy())
        elif self.config["score_mode"] == "binned":
            bins = self.config["bins"]
            binned = BinnedScores(bins)
            if px is not None:
                binned.load_state_dict(_check_binned(px, bins, "pixels"))
            for c, st in (state.get("pixels_per_class") or {}).items():
                binned_pc[c] = BinnedScores(bins)
                binned_pc[c].load_state_dict(_check_binned(st, bins, f"pixels of class {c}"))
        self._rows, self._chunks, self._scores, self._spent = rows, chunks, buffer, False
        if binned is not None:
            self._binned, self._binned_pc = binned, binned_pc

    def merge(self, other: "MeterSet") -> "MeterSet":
        """Add ``other``'s queries to this meter (disjoint keys required). Returns ``self``."""
        self._check_config(other.config, "merge meters")
        self._check_live()
        other._check_live()
        dup = set(self._rows) & set(other._rows)
        if dup:
            e, q, c = sorted(dup)[0]
            raise FdsError(f"cannot merge meters: query '{q}' of episode {e} ({c}) is in both "
                           f"({len(dup)} duplicates); shards must hold disjoint queries")
        self._rows.update({k: dict(v) for k, v in other._rows.items()})
        if self.config["score_mode"] == "exact":
            start = self._scores.append(other._scores.stored())
            self._chunks.update({k: (a + start, *rest) for k, (a, *rest) in other._chunks.items()})
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
    def compute(self, consume: bool = False) -> dict:
        """All metrics as a JSON-able dict (fractions in [0, 1]; ``None`` where undefined).
        ``consume``: this is the meter's last use — exact mode sorts its stored scores in place
        rather than a copy of them (half the memory, no copy), and the meter is spent afterwards."""
        self._check_live()
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
        # pixel level (per class first: the pooled exact scores may then be sorted in place)
        per_class = self._per_class_pixel_metrics(keys, r) if cfg["per_class_scores"] else None
        names = ("pixel_auroc", "pixel_f1_max", "pixel_f1_threshold", "aupro")
        if cfg["score_mode"] == "off":
            out.update({k: None for k in names})
        elif cfg["score_mode"] == "binned":
            out.update(self._binned.compute(cfg["fpr_limit"]))
            out["bins"] = cfg["bins"]
        else:
            out.update(self._exact(keys, int(r["n_regions"].sum()), in_place=consume))
            if cfg["logits"] and out["pixel_f1_threshold"] is not None:
                out["pixel_f1_threshold"] = float(_sigmoid(np.float64(out["pixel_f1_threshold"])))
        if per_class is not None:
            for c, d in out["per_class"].items():
                d.update(per_class[c])
            for k in ("pixel_auroc", "pixel_f1_max", "aupro"):
                v = [d[k] for d in out["per_class"].values() if d[k] is not None]
                out[k + "_classmean"] = float(np.mean(v)) if v else None
        out["n_pixels"] = int((r["tp"] + r["fp"] + r["fn"] + r["tn"]).sum())
        if consume:
            self._spent = True
            self._scores.release()
        return out

    def _per_class_pixel_metrics(self, keys: list[tuple], r: dict) -> dict[str, dict] | None:
        """{class: its pixel_auroc, pixel_f1_max, aupro} (``None`` in score mode off)."""
        if self.config["score_mode"] == "off":
            return None
        nreg: dict[str, int] = {}
        for c, n in zip(r["class_key"], r["n_regions"].tolist()):
            nreg[c] = nreg.get(c, 0) + n
        out = {}
        for c in nreg:
            if self.config["score_mode"] == "binned":
                pc = self._binned_pc[c].compute(self.config["fpr_limit"])
            else:
                pc = self._exact([k for k in keys if k[2] == c], nreg[c])
            out[c] = {k: pc[k] for k in ("pixel_auroc", "pixel_f1_max", "aupro")}
        return out

    def _exact(self, keys: list[tuple], n_regions: int, in_place: bool = False) -> dict:
        """Exact pixel metrics of the queries ``keys`` (sorted); ``in_place``: of every query, sorting
        the buffer itself."""
        stored = self._scores.stored()
        ch = [self._chunks[k] for k in keys]
        empty = np.zeros(0, stored.dtype)
        pos = np.concatenate([stored[p.astype(np.int64) + a] for a, _, p, _ in ch]) if ch else empty
        size = np.concatenate([s for _, _, _, s in ch]).astype(np.float64) if ch else np.zeros(0)
        if in_place:
            scores = stored
        else:
            scores = np.concatenate([stored[a:a + n] for a, n, _, _ in ch]) if ch else empty
        return _exact_pixel_metrics(scores, pos, size, n_regions, self.config["fpr_limit"])


def _bad_state(what: str) -> FdsError:
    return FdsError(f"meter state is inconsistent: {what}")


def _int_array(x, what: str, n: int | None = None, lo: int = 0) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)) or (n is not None and a.size != n):
        raise _bad_state(f"{what} is not a vector of {n if n is not None else 'some'} integers")
    if a.size and int(a.min()) < lo:
        raise _bad_state(f"{what} has values below {lo}")
    return a.astype(np.int64, copy=False)


def _check_rows(r) -> list[tuple]:
    """The row keys of a state's ``rows`` columns, after checking types, lengths and duplicates."""
    if not isinstance(r, dict):
        raise _bad_state("no rows")
    try:
        n = len(r["query_id"])
        qids, cks = [str(v) for v in r["query_id"]], [str(v) for v in r["class_key"]]
    except (KeyError, TypeError):
        raise _bad_state("rows lack query_id/class_key") from None
    if len(cks) != n:
        raise _bad_state("rows columns differ in length")
    eps = _int_array(r.get("episode", []), "rows.episode", n)
    for c in _ROW_INT:
        _int_array(r.get(c, []), f"rows.{c}", n)
    sc = np.asarray(r.get("image_score", []))
    if sc.shape != (n,) or (n and not np.issubdtype(sc.dtype, np.floating)) or not np.isfinite(sc).all():
        raise _bad_state("rows.image_score is not a vector of finite floats")
    keys = list(zip(eps.tolist(), qids, cks))
    if len(set(keys)) != n:
        raise _bad_state("a (episode, query, class) row appears twice")
    return keys


def _check_exact_pixels(px, r, logits: bool) -> None:
    """Offsets monotone and in bounds, one chunk per row of the size its confusion counts say,
    positive indices inside their chunk and as many as tp + fn, finite scores (in [0, 1] unless
    they are logits)."""
    if not isinstance(px, dict):
        raise _bad_state("exact mode without pixel scores")
    n = len(r["query_id"])
    try:
        scores = np.asarray(px["scores"])
        pos_idx, pos_size = np.asarray(px["pos_idx"]), np.asarray(px["pos_region_size"])
    except KeyError as e:
        raise _bad_state(f"pixels lack {e}") from None
    off = _int_array(px.get("offsets"), "pixels.offsets", n + 1)
    poff = _int_array(px.get("pos_offsets"), "pixels.pos_offsets", n + 1)
    if scores.ndim != 1 or (scores.size and scores.dtype not in (np.float32, np.float64)):
        raise _bad_state("pixels.scores is not a float32/float64 vector")
    for o, total, what in ((off, scores.size, "offsets"), (poff, pos_idx.size, "pos_offsets")):
        if o[0] != 0 or o[-1] != total or (np.diff(o) < 0).any():
            raise _bad_state(f"pixels.{what} do not partition their array")
    if pos_size.shape != pos_idx.shape:
        raise _bad_state("pixels.pos_region_size and pos_idx differ in length")
    _int_array(pos_idx, "pixels.pos_idx")
    _int_array(pos_size, "pixels.pos_region_size", lo=1)
    size = np.diff(off)
    total = sum(np.asarray(r[c], np.int64) for c in ("tp", "fp", "fn", "tn")) if n else np.zeros(0, np.int64)
    if not np.array_equal(size, total):
        raise _bad_state("a pixel chunk's size differs from its row's confusion counts")
    if not np.array_equal(np.diff(poff), np.asarray(r["tp"], np.int64) + np.asarray(r["fn"], np.int64)):
        raise _bad_state("a chunk's positive pixels differ from its row's tp + fn")
    if pos_idx.size and (pos_idx >= np.repeat(size, np.diff(poff))).any():
        raise _bad_state("a positive pixel index lies outside its chunk")
    if scores.size and not (np.isfinite(scores).all() and (logits or (scores.min() >= 0 and scores.max() <= 1))):
        raise _bad_state("pixel scores are not finite probabilities")


def _check_binned(st, bins: int, what: str) -> dict:
    if not isinstance(st, dict) or int(st.get("bins", -1)) != bins:
        raise _bad_state(f"{what}: histograms of another bin count")
    for k in ("pos", "neg", "pro"):
        _int_array(st.get(k), f"{what}.{k}", bins)
    if int(st.get("n_regions", -1)) < 0:
        raise _bad_state(f"{what}: negative region count")
    return st


def state_to_arrays(state: dict) -> dict[str, np.ndarray]:
    """A :meth:`MeterSet.state_dict` as flat numpy arrays (strings as unicode arrays, the config as
    JSON text) for ``numpy.savez`` — no object arrays, so it is read back with ``allow_pickle=False``."""
    import json

    out = {"version": np.int64(state["version"]), "config": np.str_(json.dumps(state["config"], sort_keys=True))}
    for k, v in state["rows"].items():
        out[f"rows.{k}"] = np.asarray(v, dtype=str) if k in ("query_id", "class_key") else np.asarray(v)
    if state.get("pixels") is not None:
        for k, v in state["pixels"].items():
            out[f"pixels.{k}"] = np.asarray(v)
    for c, st in (state.get("pixels_per_class") or {}).items():
        for k, v in st.items():
            out[f"pixels_per_class.{c}.{k}"] = np.asarray(v)
    return out


def state_from_arrays(arrays: dict[str, np.ndarray]) -> dict:
    """Inverse of :func:`state_to_arrays` (the result still goes through the checks of
    :meth:`MeterSet.load_state_dict`)."""
    import json

    try:
        state = {"version": int(arrays["version"]), "config": json.loads(str(arrays["config"])),
                 "rows": {}, "pixels": None}
    except (KeyError, ValueError, TypeError) as e:
        raise _bad_state(f"no version/config ({e})") from None
    for name, v in arrays.items():
        head, _, rest = name.partition(".")
        if head == "rows":
            state["rows"][rest] = v.tolist() if rest in ("query_id", "class_key") else v
        elif head == "pixels":
            state["pixels"] = state["pixels"] or {}
            state["pixels"][rest] = int(v) if v.ndim == 0 else v
        elif head == "pixels_per_class":
            c, _, k = rest.rpartition(".")
            state.setdefault("pixels_per_class", {}).setdefault(c, {})[k] = int(v) if v.ndim == 0 else v
    return state


def _exact_pixel_metrics(scores: np.ndarray, pos: np.ndarray, size: np.ndarray, n_regions: int,
                         fpr_limit: float) -> dict:
    """Exact pixel metrics from every pixel score (sorted here, in place), the positives' scores and
    their regions' sizes, in canonical (sorted key) order. The negatives are the sorted scores minus
    the (few) positives' scores: no pass over all pixels separates them."""
    scores.sort()
    order = np.argsort(pos, kind="stable")  # sorted needles make searchsorted cache-friendly
    pos, size = pos[order], size[order]
    neg = SortedNegatives(scores, pos)
    f1, t = f1max_exact(pos, neg)
    out = {
        "pixel_auroc": auroc_exact(pos, neg),
        "pixel_f1_max": f1, "pixel_f1_threshold": t,
        "aupro": aupro_exact(pos, 1.0 / np.maximum(size, 1.0), neg, n_regions, fpr_limit),
    }
    for k in ("pixel_auroc", "pixel_f1_max", "aupro"):  # exact: no binning error
        out[k + "_error_bound"] = None if out[k] is None else 0.0
    return out
