"""HoVer-Net losses: CE + Dice (pixels, types), MSE + gradient MSE (HV), BCE + Dice (contour)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from .network import NetOutput

__all__ = ["LossWeights", "hovernet_loss", "type_loss", "type_loss_parts"]


@dataclass(frozen=True)
class LossWeights:
    """Weights of each loss term (saved in the training config)."""

    np_ce: float = 1.0
    np_dice: float = 1.0
    hv_mse: float = 1.0
    hv_msge: float = 2.0
    contour_bce: float = 1.0
    contour_dice: float = 1.0
    type_ce: float = 1.0
    type_dice: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def _soft_dice(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """1 - Dice, summed over the batch's pixels per channel and averaged over channels."""
    dims = (0, 2, 3)
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


def _sobel_pair(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """5x5 Sobel-type kernels for d/dx and d/dy, used by the gradient-MSE term."""
    r = torch.arange(-2, 3, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    denom = xx * xx + yy * yy
    denom[2, 2] = 1.0
    kx = xx / denom
    ky = yy / denom
    return kx[None, None], ky[None, None]


def _hv_gradient_mse(pred: torch.Tensor, true: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    kx, ky = _sobel_pair(pred.device, pred.dtype)
    grads = []
    for t in (pred, true):
        gh = F.conv2d(t[:, :1], kx, padding=2)
        gv = F.conv2d(t[:, 1:2], ky, padding=2)
        grads.append(torch.cat([gh, gv], dim=1))
    diff = (grads[0] - grads[1]) ** 2 * fg
    return diff.sum() / (2.0 * fg.sum() + 1e-6)


def hovernet_loss(
    out: NetOutput,
    fg: torch.Tensor,
    hv: torch.Tensor,
    contour: torch.Tensor,
    types: torch.Tensor | None = None,
    weights: LossWeights | None = None,
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts.

    Parameters
    ----------
    out : NetOutput
        Network outputs.
    fg : (N, H, W) long tensor of 0/1.
    hv : (N, 2, H, W) float tensor in [-1, 1].
    contour : (N, H, W) float tensor of 0/1.
    types : (N, H, W) long tensor of classes, or None. An image whose nuclei have no
        types (every pixel -1) adds no type loss; the type terms are averaged over the
        typed images only.
    class_weights : (K,) tensor, optional
        Per-class weights of the type cross-entropy (background first).
    """
    w = weights or LossWeights()
    parts: dict[str, torch.Tensor] = {}
    parts["np_ce"] = F.cross_entropy(out.np_logits, fg)
    np_prob = out.np_logits.softmax(1)
    parts["np_dice"] = _soft_dice(np_prob, F.one_hot(fg, 2).permute(0, 3, 1, 2).to(np_prob.dtype))
    fgf = fg[:, None].to(hv.dtype)
    parts["hv_mse"] = F.mse_loss(out.hv, hv)
    parts["hv_msge"] = _hv_gradient_mse(out.hv, hv, fgf)
    c_logit = out.contour_logits[:, 0]
    parts["contour_bce"] = F.binary_cross_entropy_with_logits(c_logit, contour)
    parts["contour_dice"] = _soft_dice(torch.sigmoid(c_logit)[:, None], contour[:, None])
    if out.type_logits is not None and types is not None:
        parts.update(type_loss_parts(out.type_logits, types, class_weights))
    return _total(parts, w)


def _total(parts: dict[str, torch.Tensor], w: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    total = sum(getattr(w, name) * value for name, value in parts.items())
    return total, {name: float(value.detach()) for name, value in parts.items()}


def type_loss_parts(
    logits: torch.Tensor, types: torch.Tensor, class_weights: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The type terms (CE + Dice) over the typed images of a batch; none when no image
    in it is typed (every pixel of an untyped image is -1). ``class_weights`` (one per
    class, background first) weigh the cross-entropy, so rare classes count more."""
    typed = (types >= 0).flatten(1).all(1)
    if not bool(typed.any()):
        return {}
    k = logits.shape[1]
    logits, t = logits[typed], types[typed]
    weight = None if class_weights is None else class_weights.to(logits.device, logits.dtype)
    t_prob = logits.softmax(1)
    return {
        "type_ce": F.cross_entropy(logits, t, weight=weight),
        "type_dice": _soft_dice(t_prob, F.one_hot(t, k).permute(0, 3, 1, 2).to(t_prob.dtype)),
    }


def type_loss(
    logits: torch.Tensor,
    types: torch.Tensor,
    weights: LossWeights | None = None,
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Only the type terms, weighted as in :func:`hovernet_loss` (training the type head
    alone); zero when no image of the batch is typed."""
    parts = type_loss_parts(logits, types, class_weights)
    if not parts:
        return logits.sum() * 0.0, {}
    return _total(parts, weights or LossWeights())
