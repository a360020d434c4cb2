"""The program one sweep trial runs as, under torchrun or `accelerate launch`.

    python -m sweeps.trial_main --storage URL --study S --number N -- preset=digits ppc.tau=0.1 ...

`ppc-sweep run --launcher torchrun|accelerate` starts this on every rank: it composes the
training config exactly as `ppc-train` would (the overrides after `--`) and trains it with a
reporter bound to the trial, so the recipe (`experiments.train`) never learns about sweeps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from experiments.config import compose_config
from ppc_core.train import TrainingInterrupted

# SIGTERM / SIGINT stopped the run at a checkpoint: the launching worker re-queues the trial.
# The launcher (torchrun) may not pass a rank's exit status on, so rank 0 also leaves a note.
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL
INTERRUPTED_FILE = "interrupted.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sweeps.trial_main", description=__doc__)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--preset", default="digits")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training config")
    args = parser.parse_args(argv)
    from experiments.train import run
    from sweeps.trial_reporter import make_reporter

    cfg = compose_config(args.preset, args.overrides)
    try:
        metrics = run(cfg, make_reporter(args.storage, args.study, args.number))
    except TrainingInterrupted as err:
        if os.environ.get("RANK", "0") == "0":
            note = {"signal": err.signal, "step": err.step, "checkpoint": str(err.checkpoint)}
            Path(cfg.train.output_dir, INTERRUPTED_FILE).write_text(json.dumps(note))
        print(f"{err}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("history", "last_logs")},
                     indent=2))


if __name__ == "__main__":
    main()
