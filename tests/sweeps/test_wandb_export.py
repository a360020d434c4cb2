"""`ppc-sweep export-wandb --study S`: the stored recipe, and a command that gives every agent
run its own folder (expanded the way wandb 0.31's agent expands it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweeps.cli import main
from sweeps.space import load_space
from sweeps.storage import default_url
from sweeps.study import Recipe, create

from .conftest import write_space

ROOT = Path(__file__).resolve().parents[2]


def _agent_command(config: dict, values: dict) -> list[str]:
    """The process wandb's agent starts for one proposal (wandb_agent.Agent._command_run)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(config["command"]))
    sweep_vars = sweep_utils.create_sweep_command_args(
        {"args": {k: {"value": v} for k, v in values.items()}})
    sweep_vars.update(interpreter=[sys.executable], program=[config["program"]],
                      env=["/usr/bin/env"])
    out = []
    for c in command:
        out += sweep_vars.get(c[2:-1]) or [] if c.startswith("${") and c.endswith("}") else [c]
    return out


@pytest.mark.slow
def test_export_uses_the_stored_recipe_and_one_folder_per_agent_run(tmp_path: Path) -> None:
    space = write_space(tmp_path / "s.yaml", fixed={"train.steps": 2, "eval.every": 2})
    url = default_url(tmp_path, "ex")
    create("ex", url, Recipe(space=load_space(space).to_dict(), sampler="random", pruner="median",
                             seeds=2, base_seed=3, prune_warmup_steps=4,
                             overrides=["track.trackers=[]"], baseline=False))
    # the flags name another space and preset: the study's recipe wins
    assert main(["export-wandb", "--study", "ex", "--root", str(tmp_path), "--space", "paper",
                 "--preset", "voc_seam_ppc"]) == 0
    config = yaml.safe_load((tmp_path / "ex/wandb_sweep.yaml").read_text())
    p = config["parameters"]
    assert p["preset"] == {"value": "digits"} and p["track.trackers"] == {"value": []}
    assert p["train.steps"] == {"value": 2} and "ppc.tau" in p and "ppc.eps" not in p
    assert p["train.seed"] == {"values": [3, 4]}
    assert config["early_terminate"]["min_iter"] == 2  # warm-up 4 steps / eval every 2
    values = {k: v["value"] if "value" in v else v.get("values", [v.get("min")])[0]
              for k, v in p.items()}
    values["ppc.tau"] = 0.1
    for run_id in ("run1", "run2"):
        env = {**os.environ, "WANDB_RUN_ID": run_id, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(_agent_command(config, values), cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        metrics = tmp_path / "ex/wandb-agent" / run_id / "metrics.json"
        assert json.loads(metrics.read_text())["step"] == 2
