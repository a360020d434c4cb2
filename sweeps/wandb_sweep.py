"""Export a search space as a W&B sweep, and run W&B's own search algorithm locally, offline.

`ppc-sweep export-wandb --study S` exports the recipe stored with study S (space, preset,
overrides, seeds, pruning warm-up). The YAML's command runs `python -m experiments.train
key=value ...` (`${args_no_hyphens}`), so the W&B agent's parameters arrive as Hydra overrides,
through `sh -c` so that each agent run trains into its own folder,
`<root>/<study>/wandb-agent/$WANDB_RUN_ID` (the agent sets WANDB_RUN_ID for the process it
starts; W&B's own `${envvar:...}` macro is expanded once, before the first run's id exists). W&B sweeps have no conditional or tied
dimensions: `when` is dropped (the dimension is always sampled) and a tied dimension becomes
one independent parameter per target; both are listed in the returned warnings.

The local runner needs W&B's `sweeps` engine (`pip install 'wandb[sweeps]'`). Its import name,
`sweeps`, is this project's package too, so it is loaded from its installed files under
another name.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import yaml

from sweeps.space import Space, format_value
from sweeps.study import METRIC


def command(run_root: str) -> list[str]:
    """The agent's command: `$0` is the agent's interpreter, `$@` the run's overrides."""
    folder = format_value(f"{run_root}/wandb-agent")
    script = f'exec "$0" -m experiments.train "$@" "train.output_dir={folder}/${{WANDB_RUN_ID:?}}"'
    return ["${env}", "sh", "-c", script, "${interpreter}", "${args_no_hyphens}"]


def _parameter(d) -> dict:
    if d.type == "categorical":
        return {"values": list(d.choices)}
    if d.type == "int":
        if d.log:
            return {"distribution": "q_log_uniform_values", "min": int(d.low), "max": int(d.high),
                    "q": 1}
        if d.step and d.step != 1:
            return {"distribution": "q_uniform", "min": int(d.low), "max": int(d.high),
                    "q": int(d.step)}
        return {"distribution": "int_uniform", "min": int(d.low), "max": int(d.high)}
    if d.log:
        return {"distribution": "log_uniform_values", "min": d.low, "max": d.high}
    if d.step:
        return {"distribution": "q_uniform", "min": d.low, "max": d.high, "q": d.step}
    return {"distribution": "uniform", "min": d.low, "max": d.high}


def to_wandb_sweep(space: Space, preset: str = "digits", overrides: list[str] | None = None,
                   project: str = "ppc", min_iter: int = 2, eta: int = 3,
                   seeds: list[int] | None = None, run_root: str = "runs/wandb",
                   ) -> tuple[dict, list[str]]:
    """(sweep config, warnings). Fixed values and overrides become `value:` parameters; the
    seeds one `value` (one seed) or `values` (W&B then searches over them: it cannot average)."""
    params: dict[str, dict] = {"preset": {"value": preset}}
    notes = []
    if seeds:
        params["train.seed"] = {"value": seeds[0]} if len(seeds) == 1 else {"values": seeds}
        if len(seeds) > 1:
            notes.append(f"seeds {seeds}: W&B runs one seed per proposal and cannot average "
                         "them; train.seed becomes a parameter (group runs by the others)")
    for o in overrides or []:
        key, value = o.split("=", 1)
        params[key] = {"value": yaml.safe_load(value)}
    params.update({k: {"value": v} for k, v in space.fixed.items()})
    for d in space.params:
        if d.when:
            notes.append(f"{d.name}: condition {d.when} dropped (W&B sweeps are unconditional)")
        if d.targets:
            notes.append(f"{d.name}: tied targets {list(d.targets)} become independent parameters")
        for target in d.targets or (d.name,):
            params[target] = _parameter(d)
    config = {
        "program": "experiments/train.py",
        "project": project,
        "method": "bayes",
        "metric": {"name": f"eval/{METRIC}", "goal": "maximize"},
        # min_iter counts logged evaluations (eval.every steps apart).
        "early_terminate": {"type": "hyperband", "min_iter": min_iter, "eta": eta},
        "parameters": params,
        "command": command(run_root),
    }
    return config, notes


def write_wandb_sweep(config: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load_engine() -> ModuleType | None:
    """W&B's `sweeps` engine under the name `wandb_sweeps_engine`, or None when not installed."""
    if "wandb_sweeps_engine" in sys.modules:
        return sys.modules["wandb_sweeps_engine"]
    try:
        dist = importlib.metadata.distribution("sweeps")
    except importlib.metadata.PackageNotFoundError:
        return None
    init = Path(dist.locate_file("sweeps/__init__.py"))
    if not init.is_file():
        return None
    spec = importlib.util.spec_from_file_location("wandb_sweeps_engine", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["wandb_sweeps_engine"] = module
    spec.loader.exec_module(module)
    return module


ENGINE_MISSING = ("W&B's sweep engine is not installed (pip install 'wandb[sweeps]', which "
                  "provides the `sweeps` package); the local W&B runner is skipped. The exported "
                  "YAML still works with `wandb sweep` + `wandb agent`.")


def run_local(config: dict, n_runs: int, root: str | Path) -> list[dict]:
    """Run `n_runs` proposals of W&B's algorithm in this process, offline; returns the runs.

    Each run trains in-process (experiments.train.run) in `<root>/wandb-local/run_<i>`; W&B's
    hyperband `stop_runs` is asked after every evaluation.
    """
    engine = load_engine()
    if engine is None:
        raise RuntimeError(ENGINE_MISSING)
    from experiments.config import compose_config
    from experiments.train import run
    from sweeps.space import format_value

    runs: list = []
    results = []
    for i in range(n_runs):
        proposal = engine.next_run(config, runs, validate=True)
        if proposal is None:
            break
        values = {k: v["value"] for k, v in proposal.config.items()}
        preset = values.pop("preset", "digits")
        name = f"run_{i}"
        out = Path(root, "wandb-local", name)
        overrides = [f"{k}={format_value(v)}" for k, v in values.items()]
        cfg = compose_config(preset, [*overrides, f"train.output_dir={out}"])
        current = engine.SweepRun(name=name, state=engine.RunState.running,
                                  config=proposal.config, history=[], summary_metrics={})
        runs.append(current)

        def reporter(step: int, metrics: dict, current=current) -> bool:
            row = {f"eval/{METRIC}": metrics[METRIC], "_step": step}
            current.history.append(row)
            current.summary_metrics = dict(row)
            stopped = engine.stop_runs(config, runs)
            return any(getattr(r, "name", r) == current.name for r in stopped)

        metrics = run(cfg, reporter)
        value = metrics.get(METRIC, math.nan)
        current.summary_metrics = {f"eval/{METRIC}": value}
        current.state = engine.RunState.finished
        results.append({"name": name, "overrides": overrides, METRIC: value,
                        "stopped_early": metrics.get("stopped_early", False)})
    return results
