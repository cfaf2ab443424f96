"""Threshold-free score metrics: AUROC, F1-max and AUPRO, exact and binned.

All functions take scores "as given" (no sigmoid, no normalisation); the caller has checked the
range. Conventions (the usual ones of the anomaly-detection literature, MVTec AD evaluation):

* A pixel/image is predicted positive at threshold ``t`` iff ``score >= t``.
* **AUROC** is the Mann-Whitney statistic ``P(s+ > s-) + 0.5 P(s+ = s-)`` — identical to the area
  under the ROC curve with ties handled by linear interpolation (scikit-learn's ``roc_auc_score``).
  Computed from integer counts, so it is order-independent and exactly reproducible.
* **F1-max** is ``max_t 2TP/(2TP+FP+FN)`` over all thresholds ``t``; the maximum is attained at a
  positive score, so only those are visited. The reported threshold is the smallest ``t`` reaching
  the maximum (scikit-learn's ``precision_recall_curve`` + ``argmax`` convention).
* **AUPRO** (Bergmann et al., MVTec AD): PRO(t) = mean over all ground-truth connected components
  ``r`` (of all images) of the fraction of ``r``'s pixels with score >= t; FPR(t) over all
  negative pixels of all images. The curve from (0, 0) through every distinct threshold, linearly
  interpolated, is integrated up to FPR = ``fpr_limit`` (0.3) and divided by ``fpr_limit`` so the
  value lies in [0, 1]. PRO is a pixel-weighted TPR with weight 1/(R |r|) per positive pixel, which
  is how it is computed here (exactly, without a threshold grid). This is the curve of the MVTec AD
  reference evaluation (regions with an all-ones 3x3 structure = 8-connectivity, start at (0, 0),
  one point per distinct score, values clipped to 1, trapezoid with interpolation at the limit),
  without its float32 cumulative sums and without thresholds sampled on a grid (a common source
  of values that differ between papers).

Undefined metrics are ``None``: AUROC without positives or without negatives, F1-max without
positives, AUPRO without regions or without negative pixels.

Binned mode (:class:`BinnedScores`): ``bins`` equal-width bins on [0, 1]; constant memory
(three int64 histograms). Bin edges are exact thresholds of the pixel set, so the binned curves
pass through points of the exact curves; the remaining error is *inside* bins and is bounded,
from the histograms alone, by (see :meth:`BinnedScores.compute`)

* AUROC: ``|err| <= 0.5 * sum_b pos_b neg_b / (P N)`` (pairs that share a bin get credit 0.5
  instead of their true 0 or 1);
* F1-max: ``0 <= exact - binned <= max_b UB_b - binned`` with ``UB_b = 2(TP_>b + pos_b) /
  (TP_>b + pos_b + FP_>b + P)``, the best F1 any threshold inside bin b could reach;
* AUPRO: ``|err| <= (sum_b 0.5 dFPR_b dPRO_b + (limit - FPR_b') dPRO_b') / fpr_limit
  + bins * 2**-41``: per bin both curves lie in the box spanned by its two edge points, the
  binned one is the box's diagonal (half a box of error at most), and the bin b' that crosses the
  FPR limit counts fully up to the limit; the last term is the fixed-point rounding of PRO weights.

A-priori bounds for continuous score distributions follow: AUROC error <= 0.5 max_b neg_b / N,
which is about 0.5 / bins when the negatives are spread over [0, 1]; in practice the
data-dependent bound above is the one reported and tested.

These bounds are returned with the values (``*_error_bound``) and are checked in the tests.
"""
from __future__ import annotations

import contextlib
import sys
import threading

import numpy as np

PRO_FIXED_BITS = 40
"""Binned AUPRO accumulates PRO weights in int64 fixed point (2**40 per region) so that merged
histograms are bit-identical whatever the order; rounding error <= 2**-41 per (region, bin)."""


# ---------------------------------------------------------------------------------------------
# exact
# ---------------------------------------------------------------------------------------------

class ScoreBuffer:
    """Every pixel score kept by an exact-mode meter, end to end in one array: float32, widened to
    float64 (losslessly) once a wider map arrives. One piece, so the final sort can run in place
    instead of on a second copy of the run's scores; :meth:`reserve` sizes it ahead (memory that is
    not written is never touched), else it doubles when full.

    Inside :meth:`reusing` (the runs of one benchmark), a buffer's memory is handed on when its
    meter is done (:meth:`release`) to the next buffer that needs as much: its pages are mapped
    already, where fresh ones would first be faulted in (and zeroed) by the kernel."""

    _lock = threading.Lock()
    _spare: np.ndarray | None = None
    _reusing = 0

    def __init__(self):
        self.data = np.empty(0, np.float32)
        self.size = 0

    @classmethod
    @contextlib.contextmanager
    def reusing(cls):
        with cls._lock:
            cls._reusing += 1
        try:
            yield
        finally:
            with cls._lock:
                cls._reusing -= 1
                if not cls._reusing:
                    cls._spare = None

    def release(self) -> None:
        """This buffer's scores are no longer needed: its memory goes to the next buffer (inside
        :meth:`reusing`) or back to the system."""
        with self._lock:
            if self._reusing and self.data.size and (self._spare is None or self.data.size > self._spare.size):
                type(self)._spare = self.data
        self.data, self.size = np.empty(0, self.data.dtype), 0

    def _resize(self, capacity: int) -> None:
        with self._lock:
            spare = self._spare
            if spare is not None and spare.dtype == self.data.dtype and spare.size >= capacity:
                type(self)._spare, new = None, spare
            else:
                new = np.empty(capacity, self.data.dtype)
        new[:self.size] = self.data[:self.size]
        self.data = new

    def reserve(self, n: int) -> None:
        """Room for ``n`` more scores without growing."""
        if self.size + n > self.data.size:
            self._resize(self.size + n)

    def append(self, scores: np.ndarray) -> int:
        """Copy ``scores`` (1-D float32/float64) to the end; returns where they start."""
        dtype = np.result_type(self.data.dtype, scores.dtype)
        if dtype != self.data.dtype:
            self.data = self.data.astype(dtype)
        start, end = self.size, self.size + scores.size
        if end > self.data.size:
            self._resize(max(end, 2 * self.data.size))
        self.data[start:end] = scores
        self.size = end
        return start

    def stored(self) -> np.ndarray:
        """The scores appended so far (a view)."""
        return self.data[:self.size]


def _exact_div(num: int, den: int) -> float:
    """Correctly rounded num/den for Python ints (no intermediate float overflow or rounding)."""
    return int(num) / int(den)


class SortedNegatives:
    """The negative scores as a sorted multiset: ``scores`` (sorted) minus ``removed`` (sorted, a
    sub-multiset of it). Exact metrics only count negatives below or above thresholds, so the
    difference is never built: a count in ``scores`` minus the same count in ``removed``. With
    ``scores`` = every pixel of a run and ``removed`` = its ground-truth pixels, no pass over all
    pixels separates the negatives."""

    def __init__(self, scores: np.ndarray, removed: np.ndarray | None = None):
        self.scores = scores
        self.removed = scores[:0] if removed is None else removed
        self.size = int(scores.size - self.removed.size)
        self.dtype = np.result_type(scores.dtype, self.removed.dtype)

    @classmethod
    def of(cls, neg) -> "SortedNegatives":
        """``neg`` as given, or an array of negative scores (sorted here)."""
        return neg if isinstance(neg, cls) else cls(np.sort(np.asarray(neg), kind="stable"))

    def searchsorted(self, v, side: str = "left") -> np.ndarray:
        """Number of negatives < v (``side="left"``) or <= v (``"right"``), as ``np.searchsorted``
        on the sorted negatives would give."""
        n = self.scores.searchsorted(v, side)
        return n - self.removed.searchsorted(v, side) if self.removed.size else n

    def kth_largest(self, k: int):
        """The ``k``-th largest negative (1 <= k <= size), by bisection over the sorted scores: the
        largest score with at least ``k`` negatives >= it is itself a negative."""
        if not self.removed.size:
            return self.scores[self.scores.size - k]
        lo, hi = 0, self.scores.size - 1  # invariant: >= k negatives are >= scores[lo]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.size - int(self.searchsorted(self.scores[mid], "left")) >= k:
                lo = mid
            else:
                hi = mid - 1
        return self.scores[lo]


def auroc_exact(pos: np.ndarray, neg) -> float | None:
    """Mann-Whitney AUROC of positive scores ``pos`` against negative scores ``neg`` (an array or
    :class:`SortedNegatives`)."""
    ns = SortedNegatives.of(neg)
    P, N = int(pos.size), ns.size
    if P == 0 or N == 0:
        return None
    less = ns.searchsorted(pos, "left")
    leq = ns.searchsorted(pos, "right")
    # 2*sum(less) + sum(eq) = sum(less) + sum(leq); int64 is exact up to 9.2e18 pairs
    num = int(less.sum(dtype=np.int64)) + int(leq.sum(dtype=np.int64))
    return _exact_div(num, 2 * P * N)


def f1max_exact(pos: np.ndarray, neg) -> tuple[float | None, float | None]:
    """(F1-max, its threshold) over all thresholds ``score >= t``."""
    ns = SortedNegatives.of(neg)
    P, N = int(pos.size), ns.size
    if P == 0:
        return None, None
    ps = np.sort(pos, kind="stable")
    t = np.unique(ps)  # candidate thresholds, ascending
    tp = P - np.searchsorted(ps, t, side="left")
    fp = N - ns.searchsorted(t, "left")
    f1 = 2.0 * tp / (tp + fp + P)  # 2TP / (2TP + FP + FN), FN = P - TP
    best = float(f1.max())
    i = int(np.flatnonzero(f1 == best)[0])  # smallest threshold reaching the max
    return best, float(t[i])


def aupro_exact(pos: np.ndarray, pos_weight: np.ndarray, neg, n_regions: int,
                fpr_limit: float = 0.3) -> float | None:
    """Exact normalised AUPRO.

    ``pos``: scores of the ground-truth pixels, in a canonical order; ``pos_weight``: 1/|r| of the
    region each belongs to; ``n_regions``: R. The curve (FPR, PRO) is piecewise linear between the
    points of consecutive distinct thresholds, starting at (0, 0).

    Stepping down through the thresholds, PRO rises at constant FPR where only positives lie (no
    area), and at a level l held by n_l negatives FPR rises by n_l / N while PRO goes from W(> l)
    to W(>= l), W being the PRO weight of the positives above: a trapezoid of
    n_l / N (W(> l) + W(>= l)) / 2. Summed over the negatives x above the level l* whose segment
    crosses the limit and swapped into a sum over the positives p,
    sum_x W(>= x) = sum_p w_p #{x : l* < x <= p} (and likewise with <): one search per positive in
    the sorted negatives, whatever the number of distinct levels."""
    ns = SortedNegatives.of(neg)
    N = ns.size
    if n_regions == 0 or N == 0:
        return None
    if not 0 < fpr_limit <= 1:
        raise ValueError("fpr_limit must be in (0, 1]")
    dt = np.result_type(ns.dtype, pos.dtype)
    p = pos.astype(dt, copy=False)
    w = pos_weight.astype(np.float64, copy=False)
    # l*: the k-th largest negative, k = floor(limit N) + 1 (the first level past FPR = limit)
    top = ns.kth_largest(min(N, int(np.floor(fpr_limit * N)) + 1))
    below, not_above = int(ns.searchsorted(top, "left")), int(ns.searchsorted(top, "right"))
    le = np.maximum(ns.searchsorted(p, "right") - not_above, 0)  # negatives in (l*, p]
    lt = np.maximum(ns.searchsorted(p, "left") - not_above, 0)   # negatives in (l*, p)
    area = (float(np.dot(w, le)) + float(np.dot(w, lt))) / (2.0 * N * n_regions)
    # the segment of l* itself, up to the limit (linear interpolation inside it)
    seg = [np.array([v]) for v in ((N - not_above) / N, (N - below) / N,
                                   min(1.0, float(w[p > top].sum()) / n_regions),
                                   min(1.0, float(w[p >= top].sum()) / n_regions))]
    area += _integrate(*seg, fpr_limit)[0]
    return min(1.0, area / fpr_limit)


def _exact_dot(a: np.ndarray, b: np.ndarray) -> int:
    """sum(a * b) of non-negative int64 vectors as an exact integer (int64 while it cannot overflow)."""
    if int(a.sum()) * int(b.max(initial=0)) < 2 ** 63:
        return int(np.dot(a, b))
    return sum(x * y for x, y in zip(a.tolist(), b.tolist()))


def _integrate(fb, fa, pb, pa, limit):
    """Area under the piecewise-linear curve with segments (fb, pb) -> (fa, pa) (FPR ascending,
    contiguous), from FPR 0 to ``limit`` with linear interpolation at the limit; and the in-box
    error bound sum(0.5 dF dP) (+ the partial box at the limit) used by the binned mode."""
    j = int(np.searchsorted(fa, limit, side="right"))  # segments [0, j) end at FPR <= limit
    df = fa[:j] - fb[:j]
    area = float(np.sum(df * (pb[:j] + pa[:j]))) / 2.0
    bound = float(np.sum(df * (pa[:j] - pb[:j]))) / 2.0
    if j < fa.size and fb[j] < limit:
        f0, f1, p0, p1 = float(fb[j]), float(fa[j]), float(pb[j]), float(pa[j])
        p_lim = p0 + (limit - f0) / (f1 - f0) * (p1 - p0)
        area += (limit - f0) * (p0 + p_lim) / 2.0
        bound += (limit - f0) * (p1 - p0)
    return area, bound


# ---------------------------------------------------------------------------------------------
# binned
# ---------------------------------------------------------------------------------------------

def bin_index(scores: np.ndarray, bins: int) -> np.ndarray:
    """Bin of each score in [0, 1]: floor(s * bins) computed in the scores' own float type
    (float32 stays float32), 1.0 in the last bin. Monotone in ``s``, which is all the error bounds
    need; the reported bin edges b/bins are exact up to one rounding of s * bins."""
    s = np.asarray(scores)
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float64)
    b = (s * s.dtype.type(bins)).astype(np.intp)
    np.minimum(b, bins - 1, out=b)
    return b


def _bincount32(idx: np.ndarray, n: int) -> np.ndarray:
    """``np.bincount(idx, minlength=n)`` of int32 indices in [0, n): where torch is loaded (as in
    every benchmark run), torch counts the int32 indices without numpy's widening copy to int64;
    the counts are the same integers. Scoring alone does not import torch for it."""
    torch = sys.modules.get("torch")
    if torch is None:
        return np.bincount(idx, minlength=n)
    return torch.bincount(torch.from_numpy(idx), minlength=n).numpy()


class BinnedScores:
    """Constant-memory pixel-score histograms: positives, negatives and fixed-point PRO weights."""

    def __init__(self, bins: int = 10000):
        if not 2 <= int(bins) < 2 ** 31 - 1:
            raise ValueError("bins must be >= 2 (and below 2**31 - 1)")
        self.bins = int(bins)
        self.pos = np.zeros(self.bins, np.int64)
        self.neg = np.zeros(self.bins, np.int64)
        self.pro = np.zeros(self.bins, np.int64)  # sum over regions of round(2**40 * c_rb / |r|)
        self.n_regions = 0

    @staticmethod
    def histogram(scores: np.ndarray, pos_idx: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
        """``scores`` float [n] in [0, 1], ``pos_idx`` the indices of the positive pixels, ascending
        -> (counts per bin, ``[negatives 0..bins | positives 0..bins]`` with bin ``bins`` holding the
        score 1.0; the bin of each positive). Histograms of parts of a map add up to the whole's."""
        s = scores if scores.dtype in (np.float32, np.float64) else scores.astype(np.float64)
        idx = np.empty(s.size, np.int32)  # floor(s * bins) in the scores' float type, in one pass;
        np.multiply(s, s.dtype.type(bins), out=idx, casting="unsafe")  # 1.0 -> bins (folded in add)
        pos_bins = idx[pos_idx]
        hist_pos = np.bincount(pos_bins, minlength=bins + 1)
        return np.concatenate((_bincount32(idx, bins + 1) - hist_pos, hist_pos)), pos_bins

    def update(self, scores: np.ndarray, pos_idx: np.ndarray, region_of_pos: np.ndarray,
               region_sizes: np.ndarray) -> None:
        """``scores`` float [n]; ``pos_idx`` the indices of the positive pixels, ascending;
        ``region_of_pos`` the region index (0..R_i-1) of each of them; ``region_sizes`` [R_i]
        pixel counts."""
        self.add(*self.histogram(scores, pos_idx, self.bins), region_of_pos, region_sizes)

    def add(self, hist: np.ndarray, pos_bins: np.ndarray, region_of_pos: np.ndarray,
            region_sizes: np.ndarray) -> None:
        """Add the output of :meth:`histogram` with the regions of the positives (see :meth:`update`)."""
        B = self.bins
        self.neg += hist[:B]
        self.neg[B - 1] += hist[B]
        self.pos += hist[B + 1:2 * B + 1]
        self.pos[B - 1] += hist[2 * B + 1]
        pb = np.minimum(pos_bins, B - 1)
        R = int(region_sizes.size)
        if R:
            key = region_of_pos.astype(np.int64) * B + pb
            uk, cnt = np.unique(key, return_counts=True)
            reg, bb = np.divmod(uk, B)
            # per (region, bin): round(2**40 * count / |r|), exact integer arithmetic
            size = region_sizes.astype(np.int64)[reg]
            w = ((cnt.astype(np.int64) << PRO_FIXED_BITS) + size // 2) // size
            np.add.at(self.pro, bb, w)
            self.n_regions += R

    def state_dict(self) -> dict:
        return {"bins": self.bins, "pos": self.pos.copy(), "neg": self.neg.copy(),
                "pro": self.pro.copy(), "n_regions": int(self.n_regions)}

    def load_state_dict(self, s: dict) -> None:
        self.bins = int(s["bins"])
        self.pos = np.asarray(s["pos"], np.int64).copy()
        self.neg = np.asarray(s["neg"], np.int64).copy()
        self.pro = np.asarray(s["pro"], np.int64).copy()
        self.n_regions = int(s["n_regions"])

    def merge(self, other: "BinnedScores") -> None:
        if other.bins != self.bins:
            raise ValueError(f"cannot merge binned scores with {other.bins} and {self.bins} bins")
        self.pos += other.pos
        self.neg += other.neg
        self.pro += other.pro
        self.n_regions += other.n_regions

    def compute(self, fpr_limit: float = 0.3) -> dict:
        B = self.bins
        P, N = int(self.pos.sum()), int(self.neg.sum())
        out = {"pixel_auroc": None, "pixel_auroc_error_bound": None,
               "pixel_f1_max": None, "pixel_f1_threshold": None, "pixel_f1_max_error_bound": None,
               "aupro": None, "aupro_error_bound": None}
        # ---- AUROC (integers, exact given the bins)
        if P and N:
            weight = 2 * (np.cumsum(self.neg) - self.neg) + self.neg  # 2 * negatives below + in the bin
            num, same = _exact_dot(self.pos, weight), _exact_dot(self.pos, self.neg)
            out["pixel_auroc"] = _exact_div(num, 2 * P * N)
            out["pixel_auroc_error_bound"] = _exact_div(same, 2 * P * N)
        # ---- F1-max at the bin edges ("score >= b/B")
        if P:
            tp_ge = np.cumsum(self.pos[::-1])[::-1]  # positives in bins >= b
            fp_ge = np.cumsum(self.neg[::-1])[::-1]
            f1 = 2.0 * tp_ge / (tp_ge + fp_ge + P)
            best = float(f1.max())
            i = int(np.flatnonzero(f1 == best)[0])
            tp_gt = np.append(tp_ge[1:], 0)
            fp_gt = np.append(fp_ge[1:], 0)
            ub = 2.0 * (tp_gt + self.pos) / (tp_gt + self.pos + fp_gt + P)
            out["pixel_f1_max"] = best
            out["pixel_f1_threshold"] = i / B
            out["pixel_f1_max_error_bound"] = max(0.0, float(ub.max()) - best)
        # ---- AUPRO on the bin-edge curve
        if self.n_regions and N:
            fpr = np.concatenate(([0.0], np.cumsum(self.neg[::-1]) / N))  # thresholds high -> low
            pro = np.concatenate(([0], np.cumsum(self.pro[::-1]))).astype(np.float64)
            pro = np.minimum(pro / (float(self.n_regions) * 2.0 ** PRO_FIXED_BITS), 1.0)
            area, bound = _integrate(fpr[:-1], fpr[1:], pro[:-1], pro[1:], fpr_limit)
            out["aupro"] = min(1.0, float(area / fpr_limit))
            out["aupro_error_bound"] = float(bound / fpr_limit) + B * 2.0 ** -(PRO_FIXED_BITS + 1)
        return out
