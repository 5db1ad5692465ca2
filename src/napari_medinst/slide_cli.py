"""``napari-medinst segment-slide SLIDE -o OUT.zarr``: a whole slide on dask.distributed.

See :mod:`napari_medinst.slide_engine` for the plan, the two phases and the store.
Exit status: 0 complete, 1 some blocks still failed after their retries (named on
stderr; ``--resume`` does them again), 2 bad input (one line, before any work).
"""

from __future__ import annotations

import os
import sys

from .cli import add_tta_args, number_arg

__all__ = ["add_parser", "run"]

# The engine's defaults, repeated so that building the parser (``--version``, ``--help``)
# imports no torch; tests/test_slide_engine.py checks they agree.
DEFAULT_BLOCK = 2048  # slide_engine.DEFAULT_BLOCK
MIN_TISSUE = 0.01  # slide_engine.MIN_TISSUE


_positive = number_arg(int, lambda v: v >= 1, "a whole number of at least 1")
_share = number_arg(float, lambda v: 0 <= v < 1, "a share from 0 to 1 (e.g. 0.01)")


def default_workers() -> int:
    """Half the CPU cores, 1 to 4 workers."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def add_parser(sub) -> None:
    """The ``segment-slide`` subcommand."""
    p = sub.add_parser("segment-slide", help="segment a whole slide on dask.distributed into a "
                       "zarr store (labels + nuclei.csv)")  # fmt: skip
    p.add_argument("slide", help="slide (.svs, .ndpi, .mrxs, .tif/.ome.tif pyramid, .zarr)")
    p.add_argument("-o", "--out", required=True, help="output store OUT.zarr")
    p.add_argument("--model", default="default", help="'default', 'classical' or a model folder")
    p.add_argument("--pixel-size", type=float, default=None,
                   help="µm per pixel of level 0 (default: the file's, else estimated)")  # fmt: skip
    p.add_argument("--modality", choices=["he", "fluorescence"], default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (on the workers)")
    p.add_argument("--block-size", type=_positive, default=DEFAULT_BLOCK, metavar="PX",
                   help=f"block core and zarr chunk, px of the working level "
                   f"(default {DEFAULT_BLOCK})")  # fmt: skip
    p.add_argument("--min-tissue", type=_share, default=MIN_TISSUE, metavar="SHARE",
                   help=f"skip blocks with less tissue than this (default {MIN_TISSUE}; "
                   "0: segment every block)")  # fmt: skip
    p.add_argument("--workers", type=_positive, default=None,
                   help="local worker processes (default: half the cores, at most 4)")  # fmt: skip
    p.add_argument("--threads-per-worker", type=_positive, default=1,
                   help="torch threads in each local worker (default: 1)")  # fmt: skip
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="use a running dask scheduler (e.g. tcp://host:8786) instead of local "
                   "workers; they must see the slide and the output at the same paths")  # fmt: skip
    add_tta_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="finish an interrupted run: skip the blocks already done")  # fmt: skip
    group.add_argument("--overwrite", action="store_true",
                       help="replace a store this command wrote")  # fmt: skip


def _report(run, plan) -> int:
    where = f"{plan.path}"
    print(f"{where}: level {plan.level} ({plan.setup.pixel_size:.3f} µm/px), "
          f"{run.n_blocks} blocks ({run.n_background} background), {run.segmented} segmented "
          f"now, {run.seconds:.1f} s")  # fmt: skip
    if run.complete:
        print(f"{where}: {run.n_nuclei} nuclei -> {run.out}")
        return 0
    items = "; ".join(f"{'block ' if isinstance(k, int) else ''}{k}: {v}"
                      for k, v in sorted(run.failed.items(), key=str))  # fmt: skip
    print(
        f"napari-medinst segment-slide: error: {len(run.failed)} block(s) failed ({items}); "
        f"{run.out} is incomplete: fix the cause and rerun with --resume",
        file=sys.stderr,
    )
    return 1


def run(args) -> int:
    """Check the output, plan, start (or join) the cluster, run, report."""
    from . import slide_engine as se
    from ._io import check_output_dir

    out = se.check_store(args.out, resume=args.resume, overwrite=args.overwrite)
    check_output_dir(out.parent)
    workers = args.workers or default_workers()
    # a scheduler is asked first (an unreachable one fails in seconds); local workers are
    # started once the slide has been planned (a bad slide fails before any start)
    client = se.connect(args.scheduler, workers, args.threads_per_worker) if args.scheduler \
        else None  # fmt: skip
    try:
        plan = se.plan_slide(args.slide, args.model, pixel_size=args.pixel_size,
                             modality=args.modality, block=args.block_size,
                             device=args.device, tta=args.tta,
                             min_tissue=args.min_tissue)  # fmt: skip
        for note in plan.notes:
            print(note, file=sys.stderr)
        if client is None:
            client = se.connect(None, workers, args.threads_per_worker)
        threads = None if args.scheduler else max(1, (os.cpu_count() or 1) // workers)
        result = se.run_slide(plan, out, client, device=args.device, resume=args.resume,
                              overwrite=args.overwrite, threads=threads,
                              progress=se.text_progress())  # fmt: skip
    finally:
        _close(client, local=not args.scheduler)
    return _report(result, plan)


def _close(client, local: bool) -> None:
    """Close the client, and the local cluster it started (never a remote scheduler)."""
    if client is None:
        return
    cluster = client.cluster if local else None
    client.close()
    if cluster is not None:
        cluster.close()
