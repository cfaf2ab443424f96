"""The data that flows through one benchmark run: episodes (ids only, as frozen in a manifest) and
the decoded support sets and queries that methods receive."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

Box = tuple[int, int, int, int]
"""A crop box (top, left, bottom, right) in pixels of the original image, bottom/right exclusive."""


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    top, left, bottom, right = box
    return array[top:bottom, left:right]


@dataclass(frozen=True)
class SupportRef:
    """One support image of an episode as the manifest stores it.

    ``crops`` are the protocol's crop boxes (SOFS non-resizing protocol: s_in_shot defect-centred
    crops at native resolution); ``None`` means the whole image is the support (a large defect in
    the SOFS protocol, or a protocol without crops)."""

    id: str
    crops: tuple[Box, ...] | None = None

    def to_json(self):
        return {"id": self.id, "crops": None if self.crops is None else [list(b) for b in self.crops]}

    @classmethod
    def from_json(cls, d):
        crops = d.get("crops")
        return cls(d["id"], None if crops is None else tuple(tuple(int(v) for v in b) for b in crops))


@dataclass(frozen=True)
class Episode:
    """One episode: a class, its support images and the query images scored against them.

    ``class_key`` is ``"<object>/<class>"`` for FSS; for FAD it is ``"<object>/*"`` and the ground
    truth of a query is the union of all its defects."""

    index: int
    class_key: str
    supports: tuple[SupportRef, ...]
    queries: tuple[str, ...]

    @property
    def object(self) -> str:
        return self.class_key.split("/", 1)[0]

    @property
    def defect_class(self) -> str:
        return self.class_key.split("/", 1)[1]

    def to_json(self):
        return {"index": self.index, "class": self.class_key,
                "supports": [s.to_json() for s in self.supports], "queries": list(self.queries)}

    @classmethod
    def from_json(cls, d):
        return cls(int(d["index"]), d["class"], tuple(SupportRef.from_json(s) for s in d["supports"]),
                   tuple(d["queries"]))


@dataclass
class Shot:
    """One decoded support image: RGB uint8 [H, W, 3], its binary mask [H, W] (the episode's class
    only; all-False for FAD), and the manifest's crop boxes (None = use the whole image)."""

    id: str
    image: np.ndarray
    mask: np.ndarray
    crops: tuple[Box, ...] | None = None

    @property
    def area_ratio(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def views(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(image, mask) pairs the protocol gives this shot: one per crop box, or the whole image."""
        if self.crops is None:
            return [(self.image, self.mask)]
        return [(crop(self.image, b), crop(self.mask, b)) for b in self.crops]


class NormalPool(Sequence[np.ndarray]):
    """Defect-free images of one product, decoded lazily (index -> RGB uint8 [H, W, 3])."""

    def __init__(self, ids: Sequence[str], loader: Callable[[str], np.ndarray]):
        self.ids = list(ids)
        self._load = loader

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._load(x) for x in self.ids[i]]
        return self._load(self.ids[i])

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self._load(x) for x in self.ids)


@dataclass
class SupportSet:
    """What ``Method.prepare`` receives: K shots of one class (masks empty for FAD), the episode's
    seed, and — for methods that declare ``normal_pool`` — the product's normal images."""

    class_key: str
    shots: list[Shot]
    seed: int
    normal_pool: NormalPool | None = None
    episode: int = -1
    #: the protocol's support crop side (0 = supports are whole images), for methods whose test
    #: windows must match the support crops (SOFS's one crop_size)
    crop_size: int = 0

    @property
    def object(self) -> str:
        return self.class_key.split("/", 1)[0]

    @property
    def shot(self) -> int:
        return len(self.shots)

    @property
    def is_normal(self) -> bool:
        """True when every support mask is empty: the few-shot anomaly detection setting."""
        return not any(s.mask.any() for s in self.shots)


@dataclass
class Query:
    """One query image, RGB uint8 [H, W, 3] at its original size."""

    id: str
    image: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]


@dataclass(frozen=True)
class Requirements:
    """What a method needs, so the harness can refuse clearly instead of failing deep inside."""

    training: bool = False  # meta-trained on the base folds: fit() before evaluation
    normal_pool: bool = False  # needs defect-free images of the product in prepare()
    weights: tuple[str, ...] = ()  # names in the weights table it loads (unless weights=random)
    fad: bool = False  # accepts supports whose masks are all empty (few-shot anomaly detection)
    gpu_recommended: bool = False


@dataclass
class TrainSource:
    """The base-fold data a meta-trained method learns from (never the test fold's objects).

    ``samples`` lists (image id, class key) pairs — one per (image, class) triple, as in the SOFS
    loader; ``images_of`` maps a class key to its image ids (for drawing supports)."""

    dataset: str
    fold: int
    seed: int
    samples: list[tuple[str, str]]
    images_of: dict[str, list[str]]
    load_image: Callable[[str], np.ndarray]
    load_mask: Callable[[str, str], np.ndarray]
    normal_ids: dict[str, list[str]] = field(default_factory=dict)  # object -> normal image ids
    #: the test protocol the model is trained for: its shot (the official FSS recipes train one model
    #: per shot) and support crop side (0 = no crops); the harness sets both from the benchmark run
    shot: int = 1
    crop_size: int = 0

    @property
    def classes(self) -> list[str]:
        return sorted(self.images_of)

    def normal_pool(self, obj: str) -> NormalPool:
        return NormalPool(self.normal_ids.get(obj, []), self.load_image)
