"""Command line: ``napari-medinst segment | evaluate | train | demo``.

Every subcommand answers bad input with one line on stderr naming the file and the
problem, exits with status 2, and leaves no partial output behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]


def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment nuclei in images, write <stem>_instances.tif")
    p.add_argument("images", nargs="+", help="TIFF, PNG or JPEG images")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--model", default="default", help="'default', 'classical' or a model folder")
    p.add_argument(
        "--pixel-size", type=float, default=None, help="µm per pixel (default: estimate)"
    )
    p.add_argument("--modality", choices=["he", "fluorescence"], default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--params", default=None, help="post-processing parameters JSON")
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="average the model over the four mirror images (default; --no-tta is about 4x "
        "faster in the model, slightly less accurate)",
    )
    p.add_argument(
        "--save-maps", action="store_true", help="also write probability, HV and contour maps"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model on image/label folders")
    p.add_argument(
        "data", nargs="+", help="data folders (images/ + labels/), optionally PATH@UM_PER_PX"
    )
    p.add_argument("--out", required=True, help="output folder (checkpoint + model/)")
    p.add_argument("--init", default=None, help="start from this model (name or folder)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--steps-per-epoch", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=None,
        help="network channels per level (default 16 32 64 96 128)",
    )
    p.add_argument(
        "--blocks",
        type=int,
        nargs="+",
        default=None,
        help="residual blocks per level below full resolution (default one each)",
    )
    p.add_argument(
        "--he-fraction",
        type=float,
        default=0.65,
        help="share of H&E crops per batch when both modalities are present (default 0.65)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--name", default=None, help="model name stored in its config")


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="segment the bundled sample; open napari or render a screenshot"
    )
    p.add_argument("-o", "--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--model", default="default")
    p.add_argument("--sample", choices=["he", "fluorescence"], default="he")
    p.add_argument(
        "--gui",
        choices=["auto", "open", "screenshot", "none"],
        default="auto",
        help="open napari (needs a display), render a screenshot, or neither",
    )


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .evaluation import add_parser as add_evaluate

    parser = argparse.ArgumentParser(prog="napari-medinst", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"napari-medinst {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment(sub)
    add_evaluate(sub)
    _add_train(sub)
    _add_demo(sub)
    return parser


def _planes(arr):
    """Yield (index, 2-D image) for a 2-D image or a stack (Z, H, W[, C])."""
    import numpy as np

    channels_last = arr.ndim == 3 and arr.shape[-1] <= 4  # colour, or rejected as such
    if arr.ndim == 3 and not channels_last and arr.shape[0] in (3, 4):
        print(
            f"note: shape {arr.shape} is segmented as {arr.shape[0]} grey planes; "
            "save colour images channel-last (H, W, 3) to segment them as colour",
            file=sys.stderr,
        )
    if arr.ndim == 2 or channels_last:
        yield None, arr
    elif arr.ndim in (3, 4):
        for z in range(arr.shape[0]):
            yield z, np.asarray(arr[z])
    else:
        from ._io import InputError

        raise InputError(f"unsupported image shape {arr.shape}")


def _outputs_for(out: Path, stem: str, save_maps: bool) -> dict[str, Path]:
    names = {"instances": f"{stem}_instances.tif", "scores": f"{stem}_instances.csv"}
    if save_maps:
        names |= {
            "prob": f"{stem}_prob.tif",
            "hv": f"{stem}_hv.tif",
            "contour": f"{stem}_contour.tif",
        }
    return {k: out / v for k, v in names.items()}


def run_segment(args) -> int:
    import numpy as np

    from ._io import InputError, read_image, write_bytes, write_tiff
    from .postprocess import PostprocessParams
    from .segment import get_model, segment

    out = Path(args.out)
    params = None
    if args.params:
        try:
            params = PostprocessParams.from_json(Path(args.params).read_text())
        except FileNotFoundError as exc:
            raise InputError(f"{args.params}: parameters file not found") from exc
        except ValueError as exc:
            raise InputError(f"{args.params}: {exc}") from exc
    jobs, stems = [], {}
    for name in args.images:
        path = Path(name)
        if path.stem in stems:
            raise InputError(
                f"{path}: same output name as {stems[path.stem]} ({path.stem}_instances.tif); "
                "segment them into different output folders"
            )
        stems[path.stem] = path
        targets = _outputs_for(out, path.stem, args.save_maps)
        clash = [str(p) for p in targets.values() if p.exists()]
        if clash and not args.overwrite:
            raise InputError(f"{clash[0]}: already exists (use --overwrite to replace)")
        jobs.append((path, read_image(path), targets))
    model = get_model(args.model, args.device)
    for path, arr, targets in jobs:
        labels, maps, rows = [], [], ["label,score"]
        for z, plane in _planes(arr):
            where = f"{path}" + (f" (plane {z})" if z is not None else "")
            try:
                seg = segment(
                    plane,
                    model,
                    pixel_size=args.pixel_size,
                    modality=args.modality,
                    params=params,
                    device=args.device,
                    tta=args.tta,
                )
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from exc
            offset = int(sum(int(lab.max()) for lab in labels))
            labels.append(seg.labels)
            rows += [f"{offset + i + 1},{s:.5f}" for i, s in enumerate(seg.scores)]
            maps.append(seg.maps)
            print(
                f"{where}: {seg.result.n_instances} nuclei (modality {seg.maps.modality}, "
                f"{seg.maps.pixel_size:.3f} µm/px{' estimated' if seg.maps.pixel_size_estimated else ''})"
            )
        stack = labels[0] if len(labels) == 1 else np.stack(labels)
        if len(labels) > 1:  # ids unique across planes
            offs = np.cumsum([0] + [int(lab.max()) for lab in labels[:-1]]).astype(np.uint32)
            stack = np.where(stack > 0, stack + offs[:, None, None], 0).astype(np.uint32)
        write_tiff(targets["instances"], stack.astype(np.uint32), overwrite=args.overwrite)
        write_bytes(targets["scores"], ("\n".join(rows) + "\n").encode(), overwrite=args.overwrite)
        if args.save_maps:
            for attr in ("prob", "hv", "contour"):
                arrs = [getattr(m.maps, attr).astype(np.float32) for m in maps]
                data = arrs[0] if len(arrs) == 1 else np.stack(arrs)
                write_tiff(targets[attr], data, overwrite=args.overwrite)
    return 0


def _net_config(args):
    from .model.network import NetConfig

    d = NetConfig().to_dict()
    if args.widths:
        d["widths"] = args.widths
    if args.blocks:
        d["blocks"] = args.blocks
    return NetConfig.from_dict(d)  # checked: a clear error for impossible shapes


def run_train(args) -> int:
    from .model.train import TrainConfig, train

    cfg = TrainConfig(
        data=list(args.data),
        out=args.out,
        init=args.init,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        lr=args.lr,
        he_fraction=args.he_fraction,
        net=_net_config(args),
        seed=args.seed,
        device=args.device,
        name=args.name or Path(args.out).name,
    )
    model_dir = train(cfg)
    print(f"model written to {model_dir}")
    metrics = json.loads((model_dir / "metrics.json").read_text())
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    return 0


def run_demo(args) -> int:
    from .demo import run_demo as demo

    return demo(out=Path(args.out), model=args.model, sample=args.sample, gui=args.gui)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``napari-medinst`` command."""
    from ._io import InputError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "segment":
            return run_segment(args)
        if args.command == "evaluate":
            from .evaluation import run

            return run(args)
        if args.command == "train":
            return run_train(args)
        return run_demo(args)
    except (InputError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"napari-medinst {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-medinst {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
