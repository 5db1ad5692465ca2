"""Training: sampling, augmentation, HoVer-Net losses, validation AJI, resumable checkpoints.

``train(config)`` is what ``napari-medinst train`` and the fine-tune widget call. Each
epoch ends with a validation pass on a held-in split (whole images, post-processing
included); the checkpoint ``checkpoint.pt`` is rewritten atomically after every epoch
and the model folder is rewritten whenever the validation AJI improves, so an
interruption loses at most one epoch and never leaves a broken model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import InputError, read_labels
from ..class_metrics import type_scores
from ..metrics import evaluate as evaluate_instances
from ..postprocess import Postprocessor, PostprocessParams
from ..preprocess import CANONICAL_PIXEL_SIZE
from ..targets import contour_map, hv_maps, relabel_sequential
from . import type_head
from .augment import AugmentConfig, copy_paste, photometric, random_crop
from .data import DEFAULT_EXCLUDE_SPLITS, Sample, load_folder
from .folder import (
    LoadedModel,
    ModelError,
    load_model,
    load_weights_into,
    own_config,
    save_model_folder,
)
from .inference import DEFAULT_TTA, CancelledError, pick_device, predict_maps
from .losses import LossWeights, hovernet_loss
from .network import NET_LIMITS, NetConfig, NucleusNet

__all__ = ["TrainConfig", "retune", "split_samples", "train", "tune_postprocess"]


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``train_config.json``)."""

    data: list[str]
    out: str
    init: str | None = None
    epochs: int = 40
    steps_per_epoch: int = 100
    batch_size: int = 8
    crop: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: torch default
    val_fraction: float = 0.15
    he_fraction: float = 0.65  # share of H&E crops in a batch when both modalities exist
    exclude_splits: list[str] = field(default_factory=lambda: sorted(DEFAULT_EXCLUDE_SPLITS))
    net: NetConfig = field(default_factory=NetConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    name: str = "napari-medinst model"
    #: names of nucleus classes 1..K for a type head (from typed data folders); empty:
    #: no type head, or the ``init`` model's head kept as it is
    type_names: list[str] = field(default_factory=list)
    #: images whose index ``label_source`` is outside this list train but are never
    #: validated on (e.g. MoNuSeg's second rasterisation, which differs from the test
    #: labels' convention by about a pixel)
    val_label_sources: list[str] = field(default_factory=lambda: ["", "xml"])
    #: train the type head alone, the rest frozen (segmentation stays exactly the
    #: ``init`` model's): typed images only, checkpoints chosen by validation mPQ
    type_head_only: bool = False
    #: weigh the type cross-entropy by each class's pixel share to the power -type_balance
    #: (0: all classes alike, 0.5: inverse square root, 1: inverse share)
    type_balance: float = 0.0
    #: channels of a type branch at 1/4 resolution (``NetConfig.type_context``; 0: none);
    #: None keeps the ``init`` model's (or ``net``'s)
    type_context: int | None = None

    def __post_init__(self) -> None:
        checks = (
            ("epochs", self.epochs >= 1, "at least 1"),
            ("steps_per_epoch", self.steps_per_epoch >= 1, "at least 1"),
            ("batch_size", 1 <= self.batch_size <= 1024, "between 1 and 1024"),
            ("crop", 32 <= self.crop <= 4096, "between 32 and 4096 px"),
            ("lr", 0 < self.lr <= 10, "positive and at most 10"),  # (NaN, inf: refused)
            ("weight_decay", 0 <= self.weight_decay <= 10, "between 0 and 10"),
            ("he_fraction", 0.0 <= self.he_fraction <= 1.0, "between 0 and 1"),
            ("val_fraction", 0.0 <= self.val_fraction < 1.0, "in [0, 1)"),
            ("type_balance", 0.0 <= self.type_balance <= 1.0, "between 0 and 1"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(
                    f"training setting {name} must be {rule}, got {getattr(self, name)}"
                )
        if self.type_head_only and not self.init:
            raise ValueError("--type-head-only trains the type head of a model: give --init")
        if self.type_head_only and self.type_names:
            raise ValueError(
                "--type-head-only keeps the model's classes; to change them, train with "
                "--type-names but without --type-head-only"
            )
        if self.type_context is not None:
            self.net = replace(self.net, type_context=self.type_context)
        if self.type_names:
            lo, hi = 1, NET_LIMITS["n_types"][1] - 1
            if not lo <= len(self.type_names) <= hi or not all(
                isinstance(n, str) and n.strip() for n in self.type_names
            ):
                raise ValueError(f"type_names must be {lo}-{hi} non-empty names")
            self.net = replace(self.net, n_types=len(self.type_names) + 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["net"], d["augment"], d["loss"] = (
            self.net.to_dict(),
            self.augment.to_dict(),
            self.loss.to_dict(),
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["net"] = NetConfig.from_dict(d.get("net", {}))
        d["augment"] = AugmentConfig.from_dict(d.get("augment", {}))
        d["loss"] = LossWeights(**d.get("loss", {}))
        return cls(**d)


def split_samples(
    samples: list[Sample], fraction: float, val_label_sources: list[str] | None = None
) -> tuple[list[Sample], list[Sample]]:
    """Deterministic held-in validation split: per data folder, by a hash of the name.

    ``fraction`` of each folder's validation-eligible images (those whose
    ``label_source`` is in ``val_label_sources``; all when None) are held out.
    """
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(getattr(s, "group", "") or s.name.split("/")[0], []).append(s)
    train, val = [], []
    for members in groups.values():
        ok = [
            s
            for s in members
            if val_label_sources is None or getattr(s, "label_source", "") in val_label_sources
        ]
        ranked = sorted(ok, key=lambda s: hashlib.sha1(s.name.encode()).hexdigest())
        n_val = max(1, round(fraction * len(ranked))) if len(members) > 1 and fraction > 0 else 0
        held = ranked[:n_val]
        val += held
        train += [s for s in members if s not in held]
    return train, val


class _Sampler:
    def __init__(self, samples: list[Sample], cfg: TrainConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        self.pools = {m: [s for s in samples if s.modality == m] for m in ("he", "fluorescence")}
        self.pools = {m: p for m, p in self.pools.items() if p}
        self.weights = {
            m: np.array([s.labels.size for s in p], np.float64) / sum(s.labels.size for s in p)
            for m, p in self.pools.items()
        }

    def _pick(self, modality: str) -> Sample:
        pool = self.pools[modality]
        return pool[int(self.rng.choice(len(pool), p=self.weights[modality]))]

    def _crop(self, s: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """An augmented crop, its labels and (typed samples) its per-pixel classes."""
        a = self.cfg.augment
        img, lab = random_crop(s.image, s.labels, self.cfg.crop, self.rng, a.scale_range)
        # nearest-neighbour crops keep the ids, so the class table still applies
        return img, lab, None if s.types is None else s.types[lab]

    def item(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
        mods = list(self.pools)
        if len(mods) == 2:
            modality = "he" if self.rng.random() < self.cfg.he_fraction else "fluorescence"
        else:
            modality = mods[0]
        img, lab, types = self._crop(self._pick(modality))
        a = self.cfg.augment
        if self.rng.random() < a.copy_paste_prob:
            d_img, d_lab, d_types = self._crop(self._pick(modality))
            if (types is None) != (d_types is None):  # classes would be made up: no types
                types = d_types = None
            img, lab, _ = copy_paste(
                img,
                lab,
                d_img,
                d_lab,
                self.rng,
                n_max=a.copy_paste_max,
                scale_range=a.copy_paste_scale,
                max_overlap=a.copy_paste_max_overlap,
                types=types,
                donor_types=d_types,
            )
        img = photometric(img, modality, a, self.rng)
        return img, lab, types, modality

    def batch(self) -> dict[str, torch.Tensor]:
        imgs, fgs, hvs, cts, tys = [], [], [], [], []
        for _ in range(self.cfg.batch_size):
            img, lab, types, _ = self.item()
            imgs.append(img)
            fgs.append(lab > 0)
            hvs.append(hv_maps(lab))
            cts.append(contour_map(lab, 1))
            # -1: this image's nuclei have no types (no type loss), 0: background
            tys.append(np.full(lab.shape, -1, np.int64) if types is None else types * (lab > 0))
        return {
            "image": torch.from_numpy(np.stack(imgs)),
            "fg": torch.from_numpy(np.stack(fgs).astype(np.int64)),
            "hv": torch.from_numpy(np.stack(hvs)),
            "contour": torch.from_numpy(np.stack(cts).astype(np.float32)),
            "types": torch.from_numpy(np.stack(tys).astype(np.int64)),
        }


def _predict_samples(
    net: NucleusNet, samples: list[Sample], device: torch.device, tta: bool = False
) -> list:
    return [
        predict_maps(net, s.image, device=device, tile=768, overlap=64, tta=tta) for s in samples
    ]


def _score(maps_list, samples: list[Sample], params: PostprocessParams) -> float:
    ajis = []
    for maps, s in zip(maps_list, samples, strict=True):
        pp = Postprocessor(maps.prob, maps.hv, maps.contour, pixel_size=CANONICAL_PIXEL_SIZE)
        res = pp.run(params)
        ajis.append(evaluate_instances(s.labels, res.labels).aji)
    return float(np.mean(ajis)) if ajis else 0.0


def _native_postprocessors(maps_list, samples: list[Sample]):
    """Per sample: a Postprocessor on the maps at the image's own pixels, and its labels.

    This is what a user gets (``segment`` resizes the maps back to the image), so
    parameters are tuned there rather than at the working scale.
    """
    out = []
    for maps, s in zip(maps_list, samples, strict=True):
        labels, px = s.labels, CANONICAL_PIXEL_SIZE
        if getattr(s, "native", None) is not None:  # a mosaic of patches, or typed
            labels, px = s.native[0], CANONICAL_PIXEL_SIZE * s.scale
        elif s.label_path and Path(s.label_path).is_file():
            labels = relabel_sequential(read_labels(s.label_path))[0]
            px = CANONICAL_PIXEL_SIZE * s.scale
        m = maps.resized(labels.shape)
        out.append((Postprocessor(m.prob, m.hv, m.contour, m.type_prob, pixel_size=px), labels))
    return out


def _tuning_scores(posts, params: PostprocessParams) -> dict[str, float]:
    ajis, pqs = [], []
    for pp, labels in posts:
        e = evaluate_instances(labels, pp.run(params).labels)
        ajis.append(e.aji)
        pqs.append(e.pq)
    aji, pq = float(np.mean(ajis)), float(np.mean(pqs))
    return {"aji": aji, "pq": pq, "objective": 0.5 * (aji + pq)}


def tune_postprocess(maps_list, samples: list[Sample], base: PostprocessParams | None = None):
    """Coordinate search of the main post-processing parameters.

    Maximises the mean of AJI and PQ (one rewards pixel overlap, the other counts
    detections and splits), scored at each image's own pixel size. Returns the best
    parameters and their ``{"aji", "pq", "objective"}`` scores.
    """
    posts = _native_postprocessors(maps_list, samples)
    best = base or PostprocessParams()
    best_scores = _tuning_scores(posts, best)
    grid = {
        "fg_threshold": [0.35, 0.4, 0.45, 0.5, 0.55, 0.6],
        "marker_threshold": [0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5],
        "contour_weight": [0.0, 0.25, 0.5, 0.75, 1.0],
        "sobel_size": [3, 5, 7],
        "smoothing": [0.0, 0.5, 1.0],
        "min_nucleus_size": [4, 10, 20],
    }
    for _ in range(2):
        for name, values in grid.items():
            for v in values:
                cand = PostprocessParams(**{**best.to_dict(), name: v})
                scores = _tuning_scores(posts, cand)
                if scores["objective"] > best_scores["objective"] + 1e-4:
                    best, best_scores = cand, scores
    return best, best_scores


def _progress(epoch: int, epochs: int, step: int, steps: int, loss: float, t0: float) -> None:
    frac = step / steps
    bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
    msg = (
        f"epoch {epoch + 1}/{epochs} [{bar}] {step}/{steps} loss {loss:.3f} {time.time() - t0:.0f}s"
    )
    if sys.stderr.isatty():
        print("\r" + msg, end="", file=sys.stderr, flush=True)
    elif step == steps or step % max(1, steps // 5) == 0:
        print(msg, file=sys.stderr, flush=True)


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    total = max(1, cfg.epochs * cfg.steps_per_epoch)

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _identity(cfg: TrainConfig) -> str:
    """What must not change when a run is resumed (epochs, steps, lr may)."""
    keys = ("data", "init", "exclude_splits", "net", "crop", "seed", "val_fraction")
    d = cfg.to_dict()
    if cfg.type_head_only:  # (runs from before the option keep their identity)
        keys += ("type_head_only",)
    return json.dumps({k: d[k] for k in keys}, sort_keys=True)


#: Colours of nucleus classes 1, 2, ... (HoVer-Net's CoNSeP order: other, inflammatory,
#: epithelial, spindle-shaped), chosen to stay apart for common colour-vision deficiencies.
TYPE_COLOURS = ("#bdbdbd", "#e66100", "#1a85ff", "#40b040", "#d35fb7", "#ffc20a", "#5d3a9b")


def _type_info(names: list[str]) -> list[dict[str, Any]]:
    """The model config's ``types``: id, name and colour of each class 1..K."""
    return [
        {"id": i + 1, "name": n.strip(), "color": TYPE_COLOURS[i % len(TYPE_COLOURS)]}
        for i, n in enumerate(names)
    ]


def _from_init(init, cfg: TrainConfig) -> tuple[NucleusNet, list[dict[str, Any]]]:
    """The network to start from: ``init``'s weights; a type head added (or replaced when
    its class count differs) when ``cfg.type_names`` asks for one, else ``init``'s kept.
    Returns it and the class table to keep (``init``'s, when its head is kept)."""
    net_cfg = NetConfig.from_dict(init.config["net"])
    kept: list[dict[str, Any]] = list(init.config.get("types") or [])
    if cfg.type_names and net_cfg.n_types != cfg.net.n_types:
        net_cfg = replace(net_cfg, n_types=cfg.net.n_types)
        kept = []
    if cfg.type_context is not None:
        net_cfg = replace(net_cfg, type_context=cfg.type_context)
    net = NucleusNet(net_cfg)
    old = init.net.config
    same_head = net_cfg.n_types == old.n_types
    same_branch = same_head and net_cfg.type_context == old.type_context
    state = {
        k: v
        for k, v in init.net.state_dict().items()
        if not (k.startswith("head_type.") and not same_head)
        and not (k.startswith("type_branch.") and not same_branch)
    }
    missing, unexpected = net.load_state_dict(state, strict=False)
    new_parts = ("head_type.", "type_branch.")
    if unexpected or any(not k.startswith(new_parts) for k in missing):
        raise ModelError(f"{init.path}: weights do not fit its network config")
    return net, kept


def _check_run_folder(out: Path, ckpt_path: Path) -> None:
    """Refuse to write a run into a folder holding something else (never clobber)."""
    if not out.exists() or ckpt_path.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    # a fine-tune run stages its data and notes before training starts
    ours = {
        "train_config.json",
        "model",
        "checkpoint.pt",
        ".checkpoint.pt.part",
        "data",
        "finetune.json",
    }
    other = [
        p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".model")
    ]
    if other:
        raise ValueError(
            f"{out}: folder is not empty and holds no training run ({', '.join(sorted(other)[:3])}"
            "...); choose an empty or new --out folder"
        )


def _check_has_nuclei(samples: list[Sample], specs: list[str]) -> None:
    """Refuse a training set whose label images hold no nucleus at all."""
    if samples and not any(s.labels.any() for s in samples):
        raise InputError(
            f"{', '.join(map(str, specs))}: every label image is empty (no nuclei): "
            "nothing to learn"
        )


_CKPT_KEYS = ("model", "optimizer", "scheduler", "epoch", "best_aji", "history")


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """Read ``checkpoint.pt`` with ``weights_only=True`` (a pickle never runs code);
    a corrupt, foreign or malicious file is a one-line ModelError naming it."""
    hint = "delete it to start over, or choose a new --out folder"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{path}: not a readable training checkpoint ({type(exc).__name__}); {hint}"
        ) from None
    if not isinstance(ck, dict) or any(k not in ck for k in _CKPT_KEYS):
        raise ModelError(f"{path}: not a napari-medinst training checkpoint; {hint}")
    return ck


def _resume(ck: dict[str, Any], path: Path, net, opt, sched) -> tuple[int, float, list]:
    """Restore network, optimiser and schedule; (epoch, best AJI, history) to go on from."""
    load_weights_into(net, ck["model"], path)
    try:
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        epoch, best = int(ck["epoch"]), float(ck["best_aji"])
        history = json.loads(ck["history"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise ModelError(
            f"{path}: checkpoint is damaged ({type(exc).__name__}); delete it to start over"
        ) from None
    if not (epoch >= 0 and isinstance(history, list)):
        raise ModelError(f"{path}: checkpoint is damaged (epoch {epoch})")
    return epoch, best, history


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.part")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    cfg: TrainConfig,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    verbose: bool = True,
) -> Path:
    """Train (or resume) and return the model folder ``cfg.out``.

    ``on_epoch`` receives ``{"epoch", "loss", "val_aji", "best_aji"}`` after each epoch
    (``val_mpq`` and ``best_mpq`` for a type-head-only run; the checkpoint keeps the best
    score under ``best_aji`` either way);
    ``should_stop`` is polled every step (Cancel): the last checkpoint and the best model
    folder stay valid.
    """
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    _check_run_folder(out, ckpt_path)
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    samples = [s for spec in cfg.data for s in load_folder(spec, frozenset(cfg.exclude_splits))]
    _check_has_nuclei(samples, cfg.data)
    train_s, val_s = split_samples(samples, cfg.val_fraction, cfg.val_label_sources)
    if not train_s:
        raise ValueError("no training images left after the validation split")
    manifest = [
        {"name": s.name, "sha256": s.sha256, "split": "val" if s in val_s else "train"}
        for s in samples
    ]

    net = NucleusNet(cfg.net)
    parent, type_info, init = None, _type_info(cfg.type_names), None
    if cfg.init:
        init = load_model(cfg.init)
        net, kept_types = _from_init(init, cfg)
        type_info = type_info or kept_types
        parent = str(init.path)
    head_only = cfg.type_head_only
    if head_only:
        train_s, val_s, he_params = _head_only_setup(cfg, init, train_s, val_s)
    trainable = type_head.freeze_all_but_type_head(net) if head_only else net.parameters()
    class_w = type_head.class_weights(train_s, net.config.n_types, cfg.type_balance)
    net.to(device)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    start_epoch, best, history = 0, -1.0, []
    if ckpt_path.exists():
        ck = _read_checkpoint(ckpt_path)
        if "identity" in ck and ck["identity"] != _identity(cfg):
            raise ValueError(
                f"{out} holds a training run with other data or another network; "
                "choose a new --out folder (or the same arguments to resume it)"
            )
        start_epoch, best, history = _resume(ck, ckpt_path, net, opt, sched)
        rng = np.random.default_rng([cfg.seed, start_epoch])
        torch.manual_seed(cfg.seed + start_epoch)
        if verbose:
            print(f"resumed from {ckpt_path} at epoch {start_epoch}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no folder
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    sampler = _Sampler(train_s, cfg, rng)
    extra = {
        "name": cfg.name,
        "parent": parent,
        # which weights exactly (a parent's folder may be replaced later, as a bundled one is)
        "parent_weights_sha256": None if init is None else init.config.get("weights_sha256"),
        "training": {"config": cfg.to_dict(), "manifest": manifest},
    }
    if type_info:
        extra["types"] = type_info
    if head_only:  # everything but the type head is the parent's: so is its training record
        segmentation = init.config.get("segmentation_training") or init.config.get("training")
        if segmentation:
            extra["segmentation_training"] = segmentation

    for epoch in range(start_epoch, cfg.epochs):
        net.train(not head_only)  # a frozen network keeps its batch-norm statistics
        t0, losses = time.time(), []
        for step in range(cfg.steps_per_epoch):
            if should_stop is not None and should_stop():
                raise CancelledError("training cancelled")
            b = {k: v.to(device) for k, v in sampler.batch().items()}
            if head_only:
                loss = type_head.head_loss(net, b, cfg.loss, class_w)
            else:
                out_t = net(b["image"])
                loss, _ = hovernet_loss(
                    out_t,
                    b["fg"],
                    b["hv"],
                    b["contour"],
                    types=b["types"],
                    weights=cfg.loss,
                    class_weights=class_w,
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if verbose:
                _progress(
                    epoch,
                    cfg.epochs,
                    step + 1,
                    cfg.steps_per_epoch,
                    float(np.mean(losses[-20:])),
                    t0,
                )
        maps = _predict_samples(net, val_s, device)
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses))}
        if head_only:  # the segmentation is frozen: choose by the types
            what = "val_mpq"
            val_score = _val_mpq(maps, val_s, he_params)
        else:
            what = "val_aji"
            val_score = _score(maps, val_s, PostprocessParams())
        record[what] = val_score
        record["seconds"] = time.time() - t0
        history.append(record)
        if val_score > best or not val_s:  # no held-in split: keep the latest
            best = val_score
            save_model_folder(
                out / "model",
                net,
                extra_config=extra,
                metrics={
                    f"{what}_default_params": val_score,
                    "epoch": epoch + 1,
                    "history": history,
                },
            )
        record["best_mpq" if head_only else "best_aji"] = best
        _atomic_torch_save(
            {
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch + 1,
                "best_aji": best,
                "history": json.dumps(history),
                "identity": _identity(cfg),
            },
            ckpt_path,
        )
        if verbose:
            label = "val mPQ" if head_only else "val AJI"
            print(
                f"\nepoch {epoch + 1}: loss {record['loss']:.4f} {label} {val_score:.4f} "
                f"(best {best:.4f})",
                file=sys.stderr,
                flush=True,
            )
        if on_epoch is not None:
            on_epoch(record)
    if head_only:
        type_head.keep_postprocessing(out / "model", init, history)
    else:
        finalize(out / "model", val_s, device, history)
    return out / "model"


def _head_only_setup(
    cfg: TrainConfig, init: LoadedModel, train_s: list[Sample], val_s: list[Sample]
):
    """Typed training and validation images, and the H&E post-processing to score
    types with, for a run that trains the type head alone."""
    train_t, val_t = type_head.typed(train_s), type_head.typed(val_s)
    if not train_t:
        raise InputError(
            f"{', '.join(map(str, cfg.data))}: no image has nucleus types (types/ folder); "
            "--type-head-only has nothing to learn from"
        )
    return train_t, val_t, init.params_for("he")


def _val_mpq(maps_list, samples: list[Sample], params: PostprocessParams) -> float:
    """mPQ of the types on validation images, counts pooled (IoU > 0.5 pairs)."""
    if not samples:
        return 0.0
    by_iou, _ = type_head.type_counts(_native_postprocessors(maps_list, samples), samples, params)
    return float(type_scores(by_iou).mpq)


def retune(
    run_dir: str | Path, device: str = "auto", model_dir: str | Path | None = None
) -> dict[str, dict[str, float]]:
    """Re-run :func:`finalize` on a finished run (after a change to the tuning itself).

    Reads the run's ``train_config.json``, rebuilds its validation split and rewrites
    ``model_dir`` (default ``run_dir/model``; a copy of it, say) with new post-processing
    defaults; returns their scores.
    """
    run = Path(run_dir)
    target = Path(model_dir) if model_dir is not None else run / "model"
    cfg = TrainConfig.from_dict(json.loads((run / "train_config.json").read_text()))
    samples = [s for spec in cfg.data for s in load_folder(spec, frozenset(cfg.exclude_splits))]
    _, val_s = split_samples(samples, cfg.val_fraction, cfg.val_label_sources)
    model = load_model(target)
    manifest = model.config.get("training", {}).get("manifest", [])
    trained_val = {(m["name"], m["sha256"]) for m in manifest if m.get("split") == "val"}
    if manifest and trained_val != {(s.name, s.sha256) for s in val_s}:
        raise ValueError(
            f"{run}: the validation images found now differ from those the run held out "
            "(data moved or changed since training); refusing to tune on other images"
        )
    history = model.metrics.get("history", [])
    finalize(target, val_s, pick_device(device), history)
    return load_model(target).metrics["val_tuned"]


def finalize(model_dir: Path, val_s: list[Sample], device: torch.device, history: list) -> None:
    """Tune post-processing per modality on the validation split and rewrite the folder."""
    model = load_model(model_dir)
    post, scores = {}, {}
    for modality in ("he", "fluorescence"):
        subset = [s for s in val_s if s.modality == modality]
        if not subset:
            continue
        maps = _predict_samples(model.net, subset, device, tta=DEFAULT_TTA)  # as users run it
        post[modality], scores[modality] = tune_postprocess(maps, subset)
    metrics = {**model.metrics, "val_tuned": scores, "history": history}
    metrics.pop("val_aji_tuned", None)
    save_model_folder(
        model_dir,
        model.net,
        extra_config=own_config(model),
        postprocess=post,
        metrics=metrics,
    )
