"""Tiled, blended inference of :class:`~.network.NucleusNet` on images of any size."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from .network import NucleusNet
from .tta import _FLIPS, DEFAULT_TTA, tta_flips  # noqa: F401  (re-exported)

__all__ = ["CancelledError", "Maps", "TileGrid", "grid_span", "pick_device", "predict_maps"]


class CancelledError(RuntimeError):
    """Raised when a caller's ``should_stop`` callback asks to stop."""


@dataclass
class Maps:
    """Network outputs for one image, at the resolution they were computed at."""

    prob: np.ndarray  # (H, W) nuclear-pixel probability
    hv: np.ndarray  # (2, H, W)
    contour: np.ndarray  # (H, W) contour probability
    type_prob: np.ndarray | None = None  # (K, H, W)
    #: (H, W) standard deviation of ``prob`` across the four mirror passes; only when
    #: asked for (``predict_maps(..., tta=True, tta_std=True)``), else None.
    tta_std: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.prob.shape

    def channels(self) -> list[np.ndarray]:
        """The maps as ``(k, H, W)`` arrays in stacking order: probability, HV, contour,
        type probabilities and TTA spread (the last two when present)."""
        parts = [self.prob[None], self.hv, self.contour[None]]
        if self.type_prob is not None:
            parts.append(self.type_prob)
        if self.tta_std is not None:
            parts.append(self.tta_std[None])
        return parts

    @classmethod
    def from_stack(cls, stack: np.ndarray, n_types: int, std: bool = False) -> Maps:
        """Views into a ``(C, H, W)`` stack in :meth:`channels`' order."""
        return cls(
            prob=stack[0],
            hv=stack[1:3],
            contour=stack[3],
            type_prob=stack[4 : 4 + n_types] if n_types else None,
            tta_std=stack[4 + n_types] if std else None,
        )

    def resized(self, shape: tuple[int, int]) -> Maps:
        """Bilinearly resampled to ``shape`` (used to go back to the image's pixels)."""
        if tuple(shape) == self.shape:
            return self
        out = resample_stack(np.concatenate(self.channels()).astype(np.float32), shape)
        n_types = 0 if self.type_prob is None else self.type_prob.shape[0]
        return Maps.from_stack(out, n_types, self.tta_std is not None)


def resample_stack(stack: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A ``(C, H, W)`` float32 stack of maps bilinearly resampled to ``shape`` (as is, when
    it has that shape already)."""
    if tuple(shape) == stack.shape[1:]:
        return stack
    t = torch.from_numpy(stack)[None]
    return F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[0].numpy()


def pick_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; anything else is checked and used."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    if device == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError("device 'mps' requested but Apple MPS is not available")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or mps")
    try:
        dev = torch.device(device)  # 'cuda:abc' is refused here
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is available")
    return dev


#: Side of the network's tiles (px at the working scale) and their overlap.
TILE = 512
OVERLAP = 64


def tile_side(stride: int, tile: int = TILE, overlap: int = OVERLAP) -> int:
    """The tile side :func:`predict_maps` uses: ``tile``, grown to hold both overlaps and
    one network stride."""
    return max(tile, 2 * overlap + stride)


def _tile_starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


@dataclass(frozen=True)
class TileGrid:
    """Where a network input lies in a larger image whose tiling it must reproduce.

    :func:`predict_maps` tiles an image from its first pixel, so the maps at a pixel
    depend on where the tiles fall around it (the network sees a tile's border with
    less context, and is not invariant to shifts off its stride). A crop of an image
    predicted on its own therefore differs slightly from the same pixels of the whole
    image. With a grid, a crop is predicted with exactly the whole image's tiles: those
    whose kept (non-zero weight) part meets ``need``, so inside ``need`` the maps equal
    the whole image's, bit for bit on the same device. The input must contain every such
    tile whole; :func:`grid_span` says which span of the whole image that is.

    Attributes
    ----------
    shape : (H, W)
        The whole image, px at the network's working scale.
    origin : (row, col)
        The input's first pixel in the whole image.
    need : (row0, row1, col0, col1)
        Half-open box, in the input's coordinates, where the maps must be the whole's.
    """

    shape: tuple[int, int]
    origin: tuple[int, int]
    need: tuple[int, int, int, int]


def _kept(start: int, length: int, tile: int, overlap: int) -> tuple[int, int]:
    """Span of a tile starting at ``start`` whose blending weight is above 0."""
    end = min(start + tile, length)
    dead = overlap // 2 if overlap > 0 else 0
    return (start if start == 0 else start + dead, end if end == length else end - dead)


def _grid_starts(length: int, lo: int, hi: int, tile: int, overlap: int) -> list[int]:
    """The whole image's tile starts whose kept part meets ``[lo, hi)``."""
    out = []
    for s in _tile_starts(length, tile, tile - overlap):
        k0, k1 = _kept(s, length, tile, overlap)
        if k0 < hi and k1 > lo:
            out.append(s)
    return out


def grid_span(
    length: int, lo: int, hi: int, *, stride: int, tile: int = TILE, overlap: int = OVERLAP
) -> tuple[int, int]:
    """The span of a whole image (one axis) an input needs for exact maps on ``[lo, hi)``.

    ``length`` is the whole image's side at the working scale, ``stride`` the network's
    (the tile size grows to fit the overlap as :func:`predict_maps` grows it).
    """
    tile = tile_side(stride, tile, overlap)
    starts = _grid_starts(length, max(0, lo), min(length, hi), tile, overlap)
    if not starts:
        return (max(0, lo), max(0, lo))
    return starts[0], min(length, starts[-1] + tile)


def _tile_boxes(
    h: int, w: int, tile: int, overlap: int, grid: TileGrid | None
) -> list[tuple[int, int, int, int, tuple[bool, bool, bool, bool]]]:
    """Tiles ``(r0, r1, c0, c1, at_edge)`` in the input's coordinates, row by row."""
    step = tile - overlap
    if grid is None:
        rows, cols, (oy, ox), (gh, gw) = (
            _tile_starts(h, tile, step),
            _tile_starts(w, tile, step),
            (0, 0),
            (h, w),
        )
    else:
        (gh, gw), (oy, ox), (n0, n1, m0, m1) = grid.shape, grid.origin, grid.need
        rows = _grid_starts(gh, oy + n0, oy + n1, tile, overlap)
        cols = _grid_starts(gw, ox + m0, ox + m1, tile, overlap)
    boxes = []
    for r in rows:
        for c in cols:
            r1, c1 = min(r + tile, gh), min(c + tile, gw)
            if r < oy or c < ox or r1 - oy > h or c1 - ox > w:
                raise ValueError(
                    f"the input ({h}x{w} px at {oy},{ox}) does not hold the whole image's tile "
                    f"at {r},{c}; read it with grid_span"
                )
            edges = (r == 0, r1 == gh, c == 0, c1 == gw)
            boxes.append((r - oy, r1 - oy, c - ox, c1 - ox, edges))
    return boxes


def _window(tile_h: int, tile_w: int, margin: int, at_edge: tuple[bool, bool, bool, bool]):
    """Blending weights: 0 in the outer ``margin // 2`` band, ramp, then 1 (not at image edges)."""

    def ramp(n: int, lo_edge: bool, hi_edge: bool) -> np.ndarray:
        w = np.ones(n, np.float32)
        if margin <= 0:
            return w
        dead = margin // 2
        r = np.linspace(0.0, 1.0, margin - dead + 2, dtype=np.float32)[1:-1]
        prof = np.concatenate([np.zeros(dead, np.float32), r])[: n // 2]
        if not lo_edge:
            w[: prof.size] = prof
        if not hi_edge:
            w[n - prof.size :] = prof[::-1]
        return w

    top, bottom, left, right = at_edge
    return ramp(tile_h, top, bottom)[:, None] * ramp(tile_w, left, right)[None, :]


def _unflip(y: torch.Tensor, rows: bool, cols: bool) -> torch.Tensor:
    """A prediction ``(C, h, w)`` on a mirrored tile, mirrored back.

    Channel 1 is the horizontal map and channel 2 the vertical one: mirroring the
    columns reverses the horizontal offsets, so that map changes sign (and likewise
    for the rows and the vertical map).
    """
    dims = [d for d, on in ((1, rows), (2, cols)) if on]
    if not dims:
        return y
    y = y.flip(dims)
    if cols:
        y[1] = -y[1]
    if rows:
        y[2] = -y[2]
    return y


@torch.inference_mode()
def _forward(
    net: NucleusNet,
    x: np.ndarray,
    device: torch.device,
    tta: bool | int = False,
    std: bool = False,
) -> np.ndarray:
    """(3, h, w) float32 -> (C, h, w) probabilities/maps; pads to the network stride.

    With ``tta`` the tile and its three mirror images go through the network one after
    the other (a batch of four would need four times the memory for no gain on a CPU)
    and the flipped-back outputs are averaged. With ``tta`` and ``std`` one more
    channel follows: the standard deviation of the probability across the four passes
    (the averaged channels are computed exactly as without it).
    """
    h, w = x.shape[1:]
    s = net.stride
    ph, pw = (-h) % s, (-w) % s
    t = torch.from_numpy(x)[None]
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        t = F.pad(t, (0, pw, 0, ph), mode=mode)
    weight = net.stem[0][0].weight  # a 3x3 kernel: its layout is unambiguous
    if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last):
        t = t.to(device).contiguous(memory_format=torch.channels_last)
    else:  # a layout mismatch between input and weights is several times slower
        t = t.to(device)
    acc = sq = None
    flips = tta_flips(tta)
    for rows, cols in flips:
        dims = [d for d, on in ((2, rows), (3, cols)) if on]
        out = net(t.flip(dims) if dims else t)
        parts = [out.np_logits.softmax(1)[:, 1:2], out.hv, torch.sigmoid(out.contour_logits)]
        if out.type_logits is not None:
            parts.append(out.type_logits.softmax(1))
        y = _unflip(torch.cat(parts, 1)[0].float(), rows, cols)
        if len(flips) > 1 and std:
            sq = y[0] * y[0] if sq is None else sq.addcmul_(y[0], y[0])
        acc = y if acc is None else acc.add_(y)
    if len(flips) > 1:
        acc /= len(flips)
    if sq is not None:  # sqrt(E[p^2] - E[p]^2), clipped at 0 against rounding
        var = (sq / len(flips)).sub_(acc[0] * acc[0]).clamp_(min=0.0)
        acc = torch.cat([acc, var.sqrt_()[None]])
    return acc[:, :h, :w].cpu().numpy()


_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


@torch.inference_mode()
def _forward_many(
    net: NucleusNet,
    tiles: list[np.ndarray],
    device: torch.device,
    tta: bool | int,
    std: bool,
    amp: str | None,
) -> list[np.ndarray]:
    """:func:`_forward` of several tiles, tiles x mirror passes in one batch.

    Tiles of different sizes are padded to the largest (reflect where possible) and
    cropped back; ``amp`` runs the network under autocast in bf16 / fp16.
    """
    if amp is not None and amp not in _AMP:
        raise ValueError(f"amp must be one of {sorted(_AMP)} or None, got {amp!r}")
    s = net.stride
    hh = max(t.shape[1] for t in tiles)
    ww = max(t.shape[2] for t in tiles)
    hh, ww = hh + (-hh) % s, ww + (-ww) % s
    batch = []
    for t in tiles:
        u = torch.from_numpy(np.ascontiguousarray(t))[None]
        ph, pw = hh - t.shape[1], ww - t.shape[2]
        if ph or pw:
            mode = "reflect" if ph < t.shape[1] and pw < t.shape[2] else "replicate"
            u = F.pad(u, (0, pw, 0, ph), mode=mode)
        batch.append(u)
    x = torch.cat(batch).to(device)
    flips = tta_flips(tta)
    views = [x.flip([d for d, on in ((2, r), (3, c)) if on]) if (r or c) else x for r, c in flips]
    xb = torch.cat(views).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=_AMP.get(amp, torch.bfloat16), enabled=amp is not None):
        out = net(xb)
    parts = [out.np_logits.float().softmax(1)[:, 1:2], out.hv.float()]
    parts.append(torch.sigmoid(out.contour_logits.float()))
    if out.type_logits is not None:
        parts.append(out.type_logits.float().softmax(1))
    y = torch.cat(parts, 1).view(len(flips), len(tiles), -1, hh, ww)
    ups = []
    for i, (r, c) in enumerate(flips):  # (N, C, h, w) each, mirrored back (see _unflip)
        u = y[i].flip([d for d, on in ((2, r), (3, c)) if on]) if (r or c) else y[i]
        sign = torch.ones(u.shape[1], device=u.device)
        sign[1], sign[2] = (-1.0 if c else 1.0), (-1.0 if r else 1.0)
        ups.append(u * sign[None, :, None, None])
    ups = torch.stack(ups)  # (F, N, C, h, w)
    mean = ups.mean(0)
    if std and len(flips) > 1:
        sd = ups[:, :, 0].var(0, unbiased=False).clamp_(min=0.0).sqrt_()
        mean = torch.cat([mean, sd[:, None]], 1)
    mean = mean.cpu().numpy()
    return [mean[i, :, : t.shape[1], : t.shape[2]] for i, t in enumerate(tiles)]


#: Seconds between two progress reports from inside the network: a report per layer
#: would flood a GUI. Cancellation is checked before every layer regardless.
PROGRESS_INTERVAL_S = 0.2


class _LayerSteps:
    """Progress and cancellation of one prediction in steps of one network layer.

    A forward pass of a 512² tile takes seconds on a laptop CPU, four of them with mirror
    averaging: reporting and checking only between tiles left the progress at 0 % for a
    whole normal-sized image and made Cancel wait for the rest of a tile. A hook before
    every leaf layer of the network checks ``should_stop`` and, every
    :data:`PROGRESS_INTERVAL_S`, reports the fraction of the tile's layers run (the
    hooks read nothing and change nothing, so the maps are the same).

    ``progress(done, total)`` counts :attr:`UNITS` per tile, so a tile boundary is
    ``(k * UNITS, n_tiles * UNITS)`` and the fraction ``done / total`` is what matters.
    """

    UNITS = 1000

    def __init__(self, progress, should_stop, n_tiles: int, per_tile: int) -> None:
        self.progress, self.should_stop = progress, should_stop
        self.total = n_tiles * self.UNITS
        self.per_tile = max(per_tile, 1)  # expected layer calls per tile
        self.tiles, self.calls = 0, 0
        self._last = time.perf_counter()

    def before_layer(self, *_: object) -> None:
        """Forward pre-hook: stop when asked; report progress now and then."""
        if self.should_stop is not None and self.should_stop():
            raise CancelledError("prediction cancelled")
        self.calls += 1
        if self.progress is not None and time.perf_counter() - self._last >= PROGRESS_INTERVAL_S:
            inside = min(self.UNITS - 1, self.calls * self.UNITS // self.per_tile)
            self._report(self.tiles * self.UNITS + inside)

    def tiles_done(self, done: int, _total: int) -> None:
        """The progress callback handed to the tile loop: ``done`` tiles are finished."""
        self.tiles, self.calls = done, 0
        if self.progress is not None:
            self._report(done * self.UNITS)

    def _report(self, done: int) -> None:
        self._last = time.perf_counter()
        self.progress(min(done, self.total), self.total)


def _layer_steps(predict):
    """Give ``predict`` (:func:`predict_maps`) per-layer progress and cancellation."""
    defaults = {k: v.default for k, v in inspect.signature(predict).parameters.items()}

    @functools.wraps(predict)
    def wrapper(net, image, **kw):
        progress, should_stop = kw.get("progress"), kw.get("should_stop")
        if progress is None and should_stop is None:
            return predict(net, image, **kw)
        opt = {**defaults, **kw}
        tile = tile_side(net.stride, opt["tile"], opt["overlap"])
        h, w = np.shape(image)[1:]
        n_tiles = len(_tile_boxes(h, w, tile, opt["overlap"], opt["grid"]))
        leaves = [m for m in net.modules() if next(m.children(), None) is None]
        steps = _LayerSteps(
            progress, should_stop, n_tiles, len(leaves) * len(tta_flips(opt["tta"]))
        )
        handles = [m.register_forward_pre_hook(steps.before_layer) for m in leaves]
        try:
            return predict(net, image, **{**kw, "progress": steps.tiles_done})
        finally:
            for handle in handles:
                handle.remove()

    return wrapper


@_layer_steps
def predict_maps(
    net: NucleusNet,
    image: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    tile: int = TILE,
    overlap: int = OVERLAP,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    tta: bool | int = False,
    tta_std: bool = False,
    batch_size: int | None = None,
    amp: str | None = None,
    grid: TileGrid | None = None,
) -> Maps:
    """Run the network over a ``(3, H, W)`` network input in overlapping tiles.

    Tiles of ``tile`` px overlap by ``overlap`` px and drop the outer half of each
    overlap, so every kept pixel has at least ``overlap / 2`` px of context; between
    tiles on the regular grid the cut lies mid-overlap, and the last tile of a row or
    column (moved back to end at the image's edge) is blended linearly into the one
    before it. With ``grid`` the input is a crop of a larger image and gets that image's
    tiles, so its maps inside ``grid.need`` are the whole image's (see :class:`TileGrid`). With
    ``tta`` (test-time augmentation) each tile's four mirror images are predicted and
    averaged: about 4x the time, smoother and slightly more accurate maps; ``tta=2``
    averages the tile and its 180° rotation (see :func:`tta_flips`). With ``tta``
    and ``tta_std`` the maps also carry :attr:`Maps.tta_std`, how much the four passes
    disagree (the other maps are unchanged; ignored without ``tta``).

    GPU path: ``batch_size`` tiles (default 8 on CUDA, 1 elsewhere) and all their
    mirror images go through the network as one batch, in channels-last layout; with
    ``amp`` ("bf16" or "fp16") under autocast in that precision (the maps are averaged
    and returned in float32). On a CPU one tile at a time is as fast and needs less
    memory, so the defaults leave the CPU path as it is.

    ``progress(done, total)`` is called after every tile and, during a tile, at most
    every :data:`PROGRESS_INTERVAL_S` s; ``should_stop()`` is checked before every layer
    of the network and raises :class:`CancelledError` (see :class:`_LayerSteps`).
    """
    if isinstance(device, str):
        device = pick_device(device)
    net.eval()
    x = np.ascontiguousarray(image, np.float32)
    _, h, w = x.shape
    tile = tile_side(net.stride, tile, overlap)
    tiles_at = _tile_boxes(h, w, tile, overlap, grid)
    n_types = net.config.n_types or 0
    std = bool(tta_std) and len(tta_flips(tta)) > 1
    n_out = 4 + n_types + std
    acc = np.zeros((n_out, h, w), np.float32)
    wsum = np.zeros((h, w), np.float32)
    boxes = [box[:4] for box in tiles_at]
    edges = {box[:4]: box[4] for box in tiles_at}
    total, done = len(boxes), 0
    if batch_size is None:
        batch_size = 8 if device.type == "cuda" else 1
    for k in range(0, total, max(1, batch_size)):
        if should_stop is not None and should_stop():
            raise CancelledError("prediction cancelled")
        chunk = boxes[k : k + max(1, batch_size)]
        tiles = [x[:, r0:r1, c0:c1] for r0, r1, c0, c1 in chunk]
        if len(chunk) == 1 and amp is None:
            ys = [_forward(net, tiles[0], device, tta, std)]
        else:
            ys = _forward_many(net, tiles, device, tta, std, amp)
        for (r0, r1, c0, c1), y in zip(chunk, ys, strict=True):
            win = _window(r1 - r0, c1 - c0, overlap, edges[r0, r1, c0, c1])
            acc[:, r0:r1, c0:c1] += y * win
            wsum[r0:r1, c0:c1] += win
        done += len(chunk)
        if progress is not None:
            progress(done, total)
    acc /= np.maximum(wsum, 1e-6)
    return Maps.from_stack(acc, n_types, std)
