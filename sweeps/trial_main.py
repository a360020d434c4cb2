"""The program one sweep trial runs as, under torchrun or `accelerate launch`.

    python -m sweeps.trial_main --storage URL --study S --number N -- preset=digits ppc.tau=0.1 ...

`ppc-sweep run --launcher torchrun|accelerate` starts this on every rank: it composes the
training config exactly as `ppc-train` would (the overrides after `--`) and trains it with a
reporter bound to the trial, so the recipe (`experiments.train`) never learns about sweeps.
"""

from __future__ import annotations

import argparse
import json

from experiments.config import compose_config
from experiments.train import run
from sweeps.trial_reporter import make_reporter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sweeps.trial_main", description=__doc__)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study", required=True)
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--preset", default="digits")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training config")
    args = parser.parse_args(argv)
    cfg = compose_config(args.preset, args.overrides)
    metrics = run(cfg, make_reporter(args.storage, args.study, args.number))
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("history", "last_logs")},
                     indent=2))


if __name__ == "__main__":
    main()
