"""SAM2 video-track few-shot defect segmentation (GFDS paper §5.2, §6.1.2, Table 4):
the support image is frame 0 of a two-frame "video" with its defect mask as
the prompt, the query is frame 1, and the official SAM2.1 video model tracks the defect into it.

f_s = E_img(I_s), f_q = E_img(I_q); f_mem = E_mem(f_s, M_s); R = D_mask(Atten(f_q, f_mem)).

``prepare`` encodes the support frame(s) and their mask memory once (the low-level recipe);
``predict`` runs only the query path (image encoder, memory attention, decoder) against that cached
memory, which gives the same logits as a fresh ``SAM2VideoPredictor`` run per query (tested).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar

import numpy as np
import torch

from fdsbench import weights as W
from fdsbench.blocks.inference import inference_context, probability_map
from fdsbench.errors import DataError, FdsError, WeightsError
from fdsbench.method import Method
from fdsbench.registry import register_method
from fdsbench.types import Query, Requirements, SupportSet

from . import official as O


@dataclasses.dataclass
class Sam2Config:
    """Defaults = the paper's best row, SAM2-s at S=1024 (Table 4), official SAM2.1 weights."""

    model: str = "s"  # t | s | b+ | l (SAM2.1 Hiera tiny / small / base+ / large)
    image_size: int = 1024  # S: frames are resized to S×S (256, 512, 1024 in the paper)
    weights: str = "default"  # "default": the SAM2.1 file from the weights table; "random"; or a path
    amp: str = "auto"  # auto: bf16 autocast + TF32 on CUDA (official usage), fp32 on CPU; "bf16" | "fp32"
    fill_holes: str = "auto"  # fill ≤ fill_hole_area px holes: auto = when sam2._C exists; "on" | "off"
    fill_hole_area: int = 8  # official build_sam2_video_predictor post-processing
    mem_mask_from_input: bool = False  # deliberate deviation: encode the S×S input mask, not the S/4 logits
    time_query_memory: bool = False  # also run the query's memory-encoder pass (propagate semantics) for FPS
    compile: bool = False  # torch.compile the image encoder, memory attention and mask decoder
    vos_optimized: bool = False  # the official SAM2VideoPredictorVOS (compiles every part; slow first call)
    jpeg_quality: int = 0  # 0: frames as decoded; >0: JPEG round trip at this quality (frame-folder videos)


PAPER_ROWS = {  # Table 4 rows: name -> (model, S)
    "sam2-t-1024": ("t", 1024), "sam2-s-1024": ("s", 1024), "sam2-b-1024": ("b+", 1024),
    "sam2-l-1024": ("l", 1024), "sam2-s-512": ("s", 512), "sam2-s-256": ("s", 256),
}


@register_method("sam2")
class Sam2VideoTrack(Method):
    """SAM2.1 video-track (GFDS paper): support = memory frame 0 with its mask, query = frame 1."""

    requires: ClassVar[Requirements] = Requirements(weights=("sam2.1_hiera_small",), fad=False, gpu_recommended=True)
    Config = Sam2Config
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        **{name: {"model": m, "image_size": s} for name, (m, s) in PAPER_ROWS.items()},
        # offline synthetic benchmark on 2 CPU cores: SAM2-t at S=256, random weights (flagged)
        "cpu": {"model": "t", "image_size": 256, "weights": "random"},
        # contract test only: smallest model at S=128 (not a paper resolution; ~3x cheaper than 256)
        "test": {"model": "t", "image_size": 128, "weights": "random"},
    }
    default_preset = "cpu"
    #: preset -> its row in GFDS Table 4 (the FPS table's paper FPS, RTX 3090 Ti)
    speed_reference: ClassVar[dict[str, str]] = {"sam2-t-1024": "SAM2-t(1024)", "sam2-s-1024": "SAM2-s(1024)",
                                                 "sam2-b-1024": "SAM2-b(1024)", "sam2-l-1024": "SAM2-l(1024)",
                                                 "sam2-s-512": "SAM2-s(512)", "sam2-s-256": "SAM2-s(256)"}

    def __init__(self, config=None, device: str = "cpu"):
        super().__init__(config, device)
        c = self.config
        self.model_key = O.canonical_model(c.model)
        self.config_file, self.weights_name = O.MODELS[self.model_key]
        # the weights file depends on the configured size (the class attribute names the default)
        self.requires = dataclasses.replace(type(self).requires, weights=(self.weights_name,))
        if c.image_size not in O.RESOLUTIONS:
            if c.image_size % 32 or c.image_size < 64:
                raise FdsError(f"sam2: image_size={c.image_size} is not usable; use 256, 512 or 1024 (paper)")
        if c.fill_holes not in ("auto", "on", "off"):
            raise FdsError(f"sam2: fill_holes='{c.fill_holes}'; use auto, on or off")
        if c.amp not in ("auto", "bf16", "fp32"):
            raise FdsError(f"sam2: amp='{c.amp}'; use auto, bf16 or fp32")
        self.sam2_C = O.sam2_c_available()
        if c.fill_holes == "on" and not self.sam2_C:
            raise FdsError("sam2: fill_holes=on needs the compiled extension sam2._C, which is not built here; "
                           "reinstall sam2 with SAM2_BUILD_CUDA=1 on a CUDA machine, or use fill_holes=auto/off")
        self.fill_holes_used = c.fill_holes == "on" or (c.fill_holes == "auto" and self.sam2_C)
        on_cuda = str(device).startswith("cuda")
        self.use_bf16 = c.amp == "bf16" or (c.amp == "auto" and on_cuda)
        self.precision = ("bf16-autocast" + ("+tf32" if on_cuda else "")) if self.use_bf16 else "fp32"
        self._provenance: dict[str, str] = {}
        self._empty_supports = 0
        self._model = None

    # ---- model -------------------------------------------------------------------------------
    @property
    def model(self):
        """The official SAM2VideoPredictor (built on first use)."""
        if self._model is None:
            self._build()
        return self._model

    def _build(self) -> None:
        c = self.config
        if str(self.device).startswith("cuda") and self.use_bf16:
            # official usage on compute capability >= 8 (sam2 README video example)
            if torch.cuda.get_device_properties(torch.device(self.device)).major >= 8:
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            else:
                self.precision = "bf16-autocast"
        with torch.random.fork_rng(devices=[]):  # random init independent of when the model is first used
            torch.manual_seed(0)
            pred = O.build_predictor(self.model_key, c.image_size, device="cpu", vos_optimized=c.vos_optimized)
        if c.weights == "random":
            self._provenance = {self.weights_name: "random-init"}
        else:
            path = None if c.weights in ("default", "", None) else c.weights
            file, prov = W.resolve(self.weights_name, path)
            load_checkpoint(pred, file)
            self._provenance = {self.weights_name: prov["sha256"]}
        pred = pred.to(self.device).eval()
        if c.compile and not c.vos_optimized:
            pred.image_encoder.forward = torch.compile(pred.image_encoder.forward, dynamic=False)
            pred.memory_attention.forward = torch.compile(pred.memory_attention.forward, dynamic=False)
            pred.sam_mask_decoder.forward = torch.compile(pred.sam_mask_decoder.forward, dynamic=False)
        self._model = pred
        self._token = object()

    def _ctx(self):
        return inference_context(self.device, self.use_bf16)

    # ---- frames --------------------------------------------------------------------------------
    def load_frame(self, image: np.ndarray, what: str = "image") -> torch.Tensor:
        """1×3×S×S normalised frame on the device, exactly as the official frame loader."""
        q = self.config.jpeg_quality
        if q:
            import io

            from PIL import Image

            buf = io.BytesIO()
            O.to_pil_rgb(image, what).save(buf, format="JPEG", quality=int(q))
            image = np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        return O.load_frame(image, self.config.image_size, what)[None].to(self.device)

    def encode_frame(self, x: torch.Tensor) -> O.FrameFeatures:
        """Image-encoder features of a 1×3×S×S frame; a frame of another size is a clear FdsError."""
        with self._ctx():
            return O.encode_frame(self.model, x)

    # ---- the contract ------------------------------------------------------------------------
    def prepare(self, support: SupportSet) -> O.SupportMemory:
        """Encode the K support frames and their mask memory once (the low-level recipe)."""
        if not support.shots:
            raise FdsError("sam2: the support set is empty; an episode needs at least one support image")
        pred = self.model
        frames, masks = [], []
        for shot in support.shots:
            img, mask = np.asarray(shot.image), np.asarray(shot.mask)
            if img.shape[:2] != mask.shape[:2]:
                raise DataError(f"support {shot.id}: mask {mask.shape[:2]} and image {img.shape[:2]} differ in size; "
                                "fix the dataset's mask file")
            frames.append(self.load_frame(img, f"support {shot.id}"))
            masks.append(O.resize_mask(mask, pred.image_size, self.device))
        with self._ctx():
            mem = O.encode_support(pred, frames, masks, owner=id(self._token), fill_holes=self.fill_holes_used,
                                   fill_hole_area=self.config.fill_hole_area,
                                   mem_mask_from_input=self.config.mem_mask_from_input,
                                   support_ids=tuple(s.id for s in support.shots))
        self._empty_supports += sum(mem.empty)
        return mem

    def predict(self, state: O.SupportMemory, query: Query) -> np.ndarray:
        """sigmoid of the query's logits at its original size (p > 0.5 ⇔ official logits > 0)."""
        low = self.query_logits(state, query.image, what=f"query {query.id}")
        H, W_ = query.size
        logits = O.logits_to_size(low.float(), (H, W_))
        return probability_map(torch.sigmoid(logits)[0, 0])

    def query_logits(self, state: O.SupportMemory, image: np.ndarray, what: str = "query") -> torch.Tensor:
        """The S/4 mask logits (1×1×S/4×S/4, float32) of one query against a cached memory."""
        if not isinstance(state, O.SupportMemory):
            raise FdsError(f"sam2.predict got a {type(state).__name__}; pass the state returned by prepare()")
        pred = self.model
        if state.owner != id(self._token) or state.image_size != pred.image_size:
            raise FdsError("sam2: this support memory was prepared by another model or resolution; "
                           "call prepare() again with this method instance")
        x = self.load_frame(image, what)
        with self._ctx():
            low = O.query_logits(pred, state, x, fill_holes=self.fill_holes_used,
                                 fill_hole_area=self.config.fill_hole_area,
                                 run_query_memory=self.config.time_query_memory)
        return low.float()

    # ---- checkpoints and provenance ----------------------------------------------------------
    def state_dict(self) -> dict:
        return {}  # no training: the weights come from the SAM2.1 file (provenance records its sha256)

    def weights_provenance(self) -> dict[str, str]:
        if not self._provenance:
            self.model  # noqa: B018 - building resolves (and checks) the weights file
        return dict(self._provenance)

    def runtime_info(self) -> dict[str, Any]:
        """What a run record needs beyond the config."""
        info = {"sam2_version": O.sam2_version(), "sam2_pinned": O.SAM2_VERSION_PINNED,
                "sam2_C_available": self.sam2_C, "fill_holes_applied": self.fill_holes_used,
                "precision": self.precision, "model_config": self.config_file, "weights_name": self.weights_name,
                "image_size": self.config.image_size, "mem_mask_from_input": self.config.mem_mask_from_input,
                "query_memory_pass_timed": self.config.time_query_memory,
                "compiled": bool(self.config.compile or self.config.vos_optimized),
                "empty_support_masks": self._empty_supports}
        if self._model is not None:
            info["params_M"] = round(sum(p.numel() for p in self._model.parameters()) / 1e6, 1)
        return info

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["runtime"] = self.runtime_info()
        return d


def load_checkpoint(pred, path) -> None:
    """Load an official SAM2 checkpoint ({"model": state dict}, torch.load weights_only) STRICTLY
    (as the official build does); any missing/unexpected key or shape mismatch is a WeightsError naming the file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"cannot read SAM2 checkpoint {path} ({type(e).__name__}: {str(e)[:160]}); "
                           "re-download it (see `fdsbench weights where sam2.1_hiera_small`)") from None
    sd = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict):
        raise WeightsError(f"SAM2 checkpoint {path} holds no state dict (expected {{'model': state dict}})")
    W.load_into(pred, sd, strict=True, source=str(path))


def timed(fn, *args, device: str = "cpu", **kw):
    """(result, seconds) with device synchronisation (used by the cache benchmark)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*args, **kw)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t
