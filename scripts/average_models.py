"""Average the weights of model folders of one training lineage (a "model soup").

Checkpoints of one run, or of a run and its low-learning-rate continuation, lie in one
basin of the loss; their average is often a little better than each and never needs a
second training run. Whether it is better is decided on the validation split
(``scripts/compare_tta.py OUT``), never on the test split.

    .venv/bin/python scripts/average_models.py OUT MODEL_DIR MODEL_DIR [...] --run runs/v7

``OUT`` becomes a run-like folder (``train_config.json`` from ``--run`` and ``model/``),
so that ``compare_tta.py`` and ``bundle_model.py`` take it as they take a run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from checkpoint_model import write_run_like  # scripts/, beside this one
from napari_medinst.model.folder import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="new run-like folder: train_config.json + model/")
    ap.add_argument("models", type=Path, nargs="+", help="model folders with one network shape")
    ap.add_argument("--run", type=Path, required=True, help="the run whose train_config.json "
                    "(data, validation split) the average is judged with")  # fmt: skip
    args = ap.parse_args()
    if len(args.models) < 2:
        ap.error("give at least two model folders")
    loaded = [load_model(m) for m in args.models]
    states = [m.net.state_dict() for m in loaded]
    if any(s.keys() != states[0].keys() for s in states[1:]):
        ap.error("the models' networks differ; only one lineage can be averaged")
    mean = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            mean[key] = sum(s[key].float() for s in states) / len(states)
        else:  # counters (batches seen): the first model's
            mean[key] = first
    base = loaded[0]
    base.net.load_state_dict(mean)
    write_run_like(args.out, args.run, base, {"averaged": [str(m) for m in args.models]})
    print(f"average of {len(states)} models written to {args.out / 'model'}")


if __name__ == "__main__":
    main()
