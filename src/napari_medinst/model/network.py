"""A small HoVer-Net-style network for CPUs.

A U-Net whose decoder feeds four 1x1 heads: nuclear-pixel logits (2 classes), HV maps
(2 channels), contour logit (1 channel) and optional nucleus-type logits (K classes), the
last optionally helped by a small branch on the decoder at 1/4 resolution.
Speed comes from few channels at full working resolution (the image is first rescaled
to a canonical pixel size), a stride-2 stem into the encoder, and most of the compute
at 1/4 - 1/16 resolution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MAX_PARAMETERS", "NET_LIMITS", "NetConfig", "NucleusNet"]

#: Allowed range of each architecture field (per entry for ``widths`` and ``blocks``;
#: ``levels`` is the length of ``widths``). A model folder is untrusted data: these
#: bounds and :data:`MAX_PARAMETERS` are checked before any memory is allocated.
NET_LIMITS: dict[str, tuple[int, int]] = {
    "in_channels": (1, 4),
    "widths": (1, 1024),
    "levels": (2, 6),
    "blocks": (1, 8),
    "n_types": (0, 64),
    "type_context": (0, 256),
}
#: Largest network (trainable parameters) a config may ask for; the default has ~0.5 M.
MAX_PARAMETERS = 50_000_000


@dataclass(frozen=True)
class NetConfig:
    """Architecture of :class:`NucleusNet` (saved in a model folder's ``config.json``).

    Parameters
    ----------
    in_channels : int
        Input channels (3: RGB, or a grey image repeated).
    widths : tuple of int
        Channels at full, 1/2, 1/4, 1/8 and 1/16 resolution.
    blocks : tuple of int
        Residual blocks in the encoder at each level below full resolution (one entry per
        down step; empty means one each). Extra blocks at coarse levels add capacity and
        context for little CPU time.
    n_types : int
        Number of nucleus classes for the type head (0 disables it).
    type_context : int
        Channels of a type branch that reads the decoder at 1/4 resolution (a 3x3 and a
        1x1 convolution) and adds its class logits to the type head's: context of its
        own for telling classes apart, for little time. 0: the 1x1 type head alone.
    """

    in_channels: int = 3
    widths: tuple[int, ...] = (16, 32, 64, 96, 128)
    n_types: int = 0
    blocks: tuple[int, ...] = ()
    type_context: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.blocks:  # one block per level: saved as configs were before ``blocks``
            del d["blocks"]
        if not self.type_context:  # likewise, configs from before the type branch
            del d["type_context"]
        return d

    def __post_init__(self) -> None:
        _check_int("in_channels", self.in_channels, NET_LIMITS["in_channels"])
        _check_int("n_types", self.n_types, NET_LIMITS["n_types"])
        _check_int("type_context", self.type_context, NET_LIMITS["type_context"])
        lo, hi = NET_LIMITS["levels"]
        if not isinstance(self.widths, tuple) or not lo <= len(self.widths) <= hi:
            raise ValueError(f"widths must list {lo}-{hi} levels, got {self.widths!r}")
        for i, w in enumerate(self.widths):
            _check_int(f"widths[{i}]", w, NET_LIMITS["widths"])
        if not isinstance(self.blocks, tuple) or (
            self.blocks and len(self.blocks) != len(self.widths) - 1
        ):
            raise ValueError(
                f"blocks must have one entry per level below full resolution "
                f"({len(self.widths) - 1}), got {self.blocks!r}"
            )
        for i, b in enumerate(self.blocks):
            _check_int(f"blocks[{i}]", b, NET_LIMITS["blocks"])
        n = self.n_parameters()
        if n > MAX_PARAMETERS:
            raise ValueError(
                f"the network would have {n / 1e6:.0f} M parameters, more than the "
                f"{MAX_PARAMETERS / 1e6:.0f} M allowed (widths {list(self.widths)}, "
                f"blocks {list(self.encoder_blocks())})"
            )

    @classmethod
    def from_dict(cls, d: dict) -> NetConfig:
        """Build from a mapping (``config.json``), refusing unknown keys, wrong types and
        sizes outside :data:`NET_LIMITS` / :data:`MAX_PARAMETERS` with a one-line error."""
        if not isinstance(d, dict):
            raise ValueError(f"invalid network config: expected an object, got {d!r:.40}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown network config keys: {sorted(unknown)}")
        d = dict(d)
        for key in ("widths", "blocks"):
            if key in d:
                if not isinstance(d[key], list | tuple):
                    raise ValueError(f"invalid network config: {key} must be a list of integers")
                d[key] = tuple(d[key])
        try:
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid network config: {exc}") from exc

    def n_parameters(self) -> int:
        """Trainable parameters of :class:`NucleusNet` for this config, computed without
        building it (3x3 convolutions without bias, each followed by a batch norm)."""
        w, c = self.widths, self.in_channels

        def conv_bn(cin: int, cout: int) -> int:
            return 9 * cin * cout + 2 * cout

        def res(ch: int) -> int:
            return 2 * conv_bn(ch, ch)

        n = conv_bn(c, w[0]) + conv_bn(w[0], w[0])
        for i, nb in enumerate(self.encoder_blocks()):
            n += conv_bn(w[i], w[i + 1]) + nb * res(w[i + 1])
            n += conv_bn(w[i + 1] + w[i], w[i]) + res(w[i])  # the matching up step
        heads = 2 + 2 + 1 + self.n_types
        n += heads * (w[0] + 1)
        if self.n_types and self.type_context:
            c = self.type_context
            n += 9 * w[self.context_level()] * c + c + (c + 1) * self.n_types
        return n

    def context_level(self) -> int:
        """Level the type branch reads: 1/4 resolution, or the coarsest there is."""
        return min(2, len(self.widths) - 1)

    def encoder_blocks(self) -> tuple[int, ...]:
        """Residual blocks per down step (``blocks``, or one each when empty)."""
        return self.blocks or (1,) * (len(self.widths) - 1)


def _check_int(name: str, value: object, limits: tuple[int, int]) -> None:
    lo, hi = limits
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r:.40}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is outside the allowed {lo}-{hi}")


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(x + y, inplace=True)


class _Up(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.fuse = _conv_bn(cin + cskip, cout)
        self.block = _ResBlock(cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.block(self.fuse(torch.cat([x, skip], dim=1)))


@dataclass
class NetOutput:
    """Raw network outputs (logits / linear), each ``(N, C, H, W)``."""

    np_logits: torch.Tensor
    hv: torch.Tensor
    contour_logits: torch.Tensor
    type_logits: torch.Tensor | None = field(default=None)


class NucleusNet(nn.Module):
    """U-Net with nuclear-pixel, HV, contour and optional type heads."""

    def __init__(self, config: NetConfig | None = None) -> None:
        super().__init__()
        self.config = config or NetConfig()
        w = self.config.widths
        if len(w) < 2:
            raise ValueError("NetConfig.widths needs at least two levels")
        if len(self.config.encoder_blocks()) != len(w) - 1:
            raise ValueError("NetConfig.blocks needs one entry per level below full resolution")
        self.stem = nn.Sequential(_conv_bn(self.config.in_channels, w[0]), _conv_bn(w[0], w[0]))
        nb = self.config.encoder_blocks()
        self.down = nn.ModuleList(
            nn.Sequential(
                _conv_bn(w[i], w[i + 1], stride=2), *(_ResBlock(w[i + 1]) for _ in range(nb[i]))
            )
            for i in range(len(w) - 1)
        )
        self.up = nn.ModuleList(_Up(w[i + 1], w[i], w[i]) for i in reversed(range(len(w) - 1)))
        self.head_np = nn.Conv2d(w[0], 2, 1)
        self.head_hv = nn.Conv2d(w[0], 2, 1)
        self.head_contour = nn.Conv2d(w[0], 1, 1)
        self.head_type = nn.Conv2d(w[0], self.config.n_types, 1) if self.config.n_types else None
        self.type_branch = None
        if self.config.n_types and self.config.type_context:
            c, level = self.config.type_context, self.config.context_level()
            self.type_branch = nn.Sequential(
                nn.Conv2d(w[level], c, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, self.config.n_types, 1),
            )
            # starts adding nothing: a branch added to a trained head starts from its
            # predictions
            nn.init.zeros_(self.type_branch[2].weight)
            nn.init.zeros_(self.type_branch[2].bias)

    @property
    def stride(self) -> int:
        """Input sizes that are multiples of this avoid padding inside the network."""
        return 2 ** (len(self.config.widths) - 1)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder's full-resolution features, which every head reads, and (with a
        type branch) its features at the level the branch reads."""
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = skips.pop()
        want = self.config.context_level() if self.type_branch is not None else -1
        level, context = len(skips), None
        for up in self.up:
            if level == want:
                context = y
            y = up(y, skips.pop())
            level -= 1
        return y, context

    def type_logits(self, y: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor | None:
        """Class logits from the features :meth:`features` returns (None without types)."""
        if self.head_type is None:
            return None
        out = self.head_type(y)
        if self.type_branch is not None and context is not None:
            extra = self.type_branch(context)
            out = out + F.interpolate(
                extra, size=y.shape[-2:], mode="bilinear", align_corners=False
            )
        return out

    def forward(self, x: torch.Tensor) -> NetOutput:
        y, context = self.features(x)
        return NetOutput(
            np_logits=self.head_np(y),
            hv=self.head_hv(y),
            contour_logits=self.head_contour(y),
            type_logits=self.type_logits(y, context),
        )
