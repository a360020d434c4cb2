from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sweeps.cli import run_worker
from sweeps.report import best_checkpoint, write_report
from sweeps.space import load_space
from sweeps.storage import default_url, fail_stale, kind, open_storage
from sweeps.study import Recipe, create, load
from sweeps.wandb_sweep import ENGINE_MISSING, load_engine, run_local, to_wandb_sweep

from .conftest import write_space


def _recipe(space: Path, **kw) -> Recipe:
    kw.setdefault("baseline", False)  # the baseline arm has its own tests (test_confirm.py)
    return Recipe(space=load_space(space).to_dict(), overrides=["track.trackers=[]"], **kw)


def test_create_then_load_restores_the_recipe(tmp_path: Path, tiny_space: Path) -> None:
    url = default_url(tmp_path, "s")
    create("s", url, _recipe(tiny_space, sampler="random", pruner="hyperband", seeds=2))
    study, recipe = load("s", url)
    assert recipe.seeds == 2 and recipe.pruner == "hyperband"
    assert isinstance(study.sampler.inner, optuna.samplers.RandomSampler)
    assert isinstance(study.pruner.inner, optuna.pruners.HyperbandPruner)
    with pytest.raises(ValueError, match="already exists"):
        create("s", url, _recipe(tiny_space))
    with pytest.raises(ValueError, match="no study 'other'.*studies there: \\['s'\\]"):
        load("other", url)


def test_multi_objective_and_sampler_checks(tmp_path: Path, tiny_space: Path) -> None:
    url = default_url(tmp_path, "m")
    study = create("m", url, _recipe(tiny_space, multi_objective=True, pruner="none", sampler="gp"))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    with pytest.raises(ValueError, match="cannot prune"):
        create("m2", url, _recipe(tiny_space, multi_objective=True))
    with pytest.raises(ValueError, match="conditional"):
        create("g", url, _recipe(tiny_space, sampler="grid"))
    with pytest.raises(ValueError, match="also dimensions or fixed"):
        create("c", url, Recipe(space=load_space(tiny_space).to_dict(), overrides=["ppc.tau=0.1"]))


def test_storage_kinds(tmp_path: Path) -> None:
    assert kind("sqlite:////a/b.db") == "sqlite"
    assert kind("postgresql://u@127.0.0.1:5/db") == "postgresql"
    assert kind(str(tmp_path / "j.log")) == "journal"
    with pytest.raises(ValueError, match="sqlite:///PATH"):
        kind("mysql://x")


def test_fail_stale_requeues_a_journal_trial(tmp_path: Path) -> None:
    storage = open_storage(f"journal://{tmp_path / 'j.log'}")
    study = optuna.create_study(storage=storage, study_name="j")
    trial = study.ask({"x": FloatDistribution(0, 1)})  # a worker that died holding it
    assert fail_stale(study, older_than_s=3600) == []
    assert fail_stale(study, older_than_s=0) == [trial.number]
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.WAITING]
    retry = study.get_trials()[1]
    assert retry.params == study.get_trials()[0].params
    assert retry.system_attrs["failed_trial"] == trial.number


def _fake_trials(study: optuna.Study, tmp_path: Path) -> None:
    dist = {"ppc.tau": FloatDistribution(0.01, 1.0, log=True)}
    for i, (tau, value) in enumerate([(0.05, 0.3), (0.1, 0.6), (0.3, 0.4)]):
        run_dir = tmp_path / f"trial_{i}" / "seed_0"
        ckpt = run_dir / "checkpoints" / "step_00000004"
        ckpt.mkdir(parents=True)
        from PIL import Image

        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(run_dir / "overlays.png")
        study.add_trial(create_trial(
            params={"ppc.tau": tau}, distributions=dist, value=value,
            intermediate_values={2: value / 2, 4: value},
            user_attrs={"output_dir": str(run_dir.parent), "best_run_dir": str(run_dir),
                        "checkpoint_dir": str(ckpt), "train_seconds": 1.0,
                        "cam_miou_per_seed": [value]}))
    study.add_trial(create_trial(state=TrialState.FAIL, params={"ppc.tau": 0.9},
                                 distributions=dist,
                                 user_attrs={"fail_reason": "NonFiniteLoss: nan at step 3"}))


def test_report_and_best_checkpoint(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize", study_name="r")
    with pytest.raises(ValueError, match="no complete trial"):
        best_checkpoint(study)
    _fake_trials(study, tmp_path)
    assert best_checkpoint(study) == tmp_path / "trial_1/seed_0/checkpoints/step_00000004"
    report = write_report(study, tmp_path / "report")
    text = report.read_text()
    assert "Trial 1: final CAM mIoU 0.6" in text and "NonFiniteLoss" in text
    for png in ("history", "parallel_coordinate", "slice", "best_overlays"):
        assert (tmp_path / "report" / f"{png}.png").stat().st_size > 0
        assert f"{png}.png" in (tmp_path / "report" / "index.html").read_text()
    # the best trial's overlays (trial 1's red tiles), not another trial's, annotated
    from PIL import Image

    img = Image.open(tmp_path / "report/best_overlays.png").convert("RGB")
    assert img.width > 200 and (80, 0, 0) in {c for _, c in img.getcolors(1 << 20)}


def test_wandb_sweep_export(tmp_path: Path) -> None:
    config, notes = to_wandb_sweep(load_space("demo"), "digits", ["track.trackers=[]"])
    assert "${args_no_hyphens}" in config["command"]
    assert config["method"] == "bayes"
    assert config["metric"] == {"name": "eval/cam_miou", "goal": "maximize"}
    assert config["early_terminate"]["type"] == "hyperband"
    p = config["parameters"]
    assert p["ppc.tau"]["distribution"] == "log_uniform_values"
    assert p["ppc.w_intra"] == p["ppc.w_cross_cam"]  # tied: exported per target, with a note
    assert p["loss.ppc_ramp_steps"] == {"value": 0} and p["track.trackers"] == {"value": []}
    assert any("independent" in n for n in notes)
    paper, notes = to_wandb_sweep(load_space("paper"))
    assert paper["parameters"]["loss.ppc_start_step"]["distribution"] == "q_uniform"
    assert any("dropped" in n for n in notes)
    yaml.safe_load(yaml.safe_dump(config))  # serialisable


def test_wandb_local_runner_skips_cleanly_without_engine(tmp_path: Path) -> None:
    if load_engine() is not None:
        pytest.skip("wandb[sweeps] installed: the local runner is exercised by hand")
    config, _ = to_wandb_sweep(load_space("demo"))
    with pytest.raises(RuntimeError, match="wandb\\[sweeps\\]"):
        run_local(config, 1, tmp_path)
    assert "skipped" in ENGINE_MISSING


def test_failing_trials_are_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    # Each end of each dimension is valid (checked at create), but lo 0.5 >= hi 0.4 is not.
    space = write_space(tmp_path / "s.yaml", params={
        "ppc.hard_rank_lo": {"type": "categorical", "choices": [0.1, 0.5]},
        "ppc.hard_rank_hi": {"type": "categorical", "choices": [0.4, 0.6]},
    })
    url = default_url(tmp_path, "f")
    study = create("f", url, _recipe(space, sampler="grid", pruner="none"))
    assert run_worker("f", url, str(tmp_path), target=4, progress=False) == 0
    trials = study.get_trials()
    assert len(trials) == 4
    by = {(t.params["ppc.hard_rank_lo"], t.params["ppc.hard_rank_hi"]): t for t in trials}
    good = by[(0.1, 0.4)]
    assert good.state == TrialState.COMPLETE and 0.0 <= good.value <= 1.0
    assert math.isclose(good.value, good.user_attrs["cam_miou_per_seed"][0])
    assert "fail_reason" not in good.user_attrs
    assert Path(good.user_attrs["checkpoint_dir"]).is_dir()
    metrics = json.loads(Path(good.user_attrs["best_run_dir"], "metrics.json").read_text())
    assert metrics["step"] == 4
    bad = by[(0.5, 0.4)]
    assert bad.state == TrialState.FAIL and "hard_rank_lo" in bad.user_attrs["fail_reason"]
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 3
