"""Run under torchrun: a tiny PPC training whose rank 1 fails at step 3 the way the PPC loss does
on a diverging run (its ValueError, raised after the loss's collectives). Each rank writes the
error it stopped with to `<out>/rank<r>.txt`."""

import os
import sys
from pathlib import Path

import experiments.train as recipe
from experiments.config import compose_config
from ppc_core.train import NonFiniteLoss
from tests.conftest import tiny_overrides

FAIL_AT = 3


def _failing_on_rank_1(build, rank: int):
    def build_training(cfg, gather=None):
        train_set, model, optimizer, objective = build(cfg, gather)
        calls = [0]

        def failing(model, images, labels, ppc_scale, generator):
            terms = objective(model, images, labels, ppc_scale, generator)
            calls[0] += 1
            if rank == 1 and calls[0] == FAIL_AT + 1:
                raise ValueError("feats_s contains NaN or inf values")
            return terms

        return train_set, model, optimizer, failing

    return build_training


if __name__ == "__main__":
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    recipe.build_training = _failing_on_rank_1(recipe.build_training, rank)
    cfg = compose_config("digits", tiny_overrides(out / "run", "train.steps=6"))
    try:
        recipe.run(cfg)
    except NonFiniteLoss as err:
        (out / f"rank{rank}.txt").write_text(f"{err}\n{err.step}\n{err.ranks}\n{err.checkpoint}")
        sys.exit(3)
