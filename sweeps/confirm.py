"""`ppc-sweep confirm`: re-run a study's best configurations and its baseline on fresh seeds,
evaluated on a split the sweep did not select on, and judge each against the baseline.

Every (arm, seed) run is one trial of the companion study `<study>-confirm` in the same storage
(user attributes `role: confirm`, `arm`, `seed`; a configuration's parameters are its trial's
parameters, so optuna-dashboard lists them). The runs are enqueued once and taken by
`study.optimize`, so they share the sweep's machinery: heartbeats, a killed run failed and
re-queued into the same folder (`<root>/<study>/confirm/<split>/<arm>/seed_<s>`) where it
resumes from its checkpoint, any storage and launcher. A finished run is never repeated: a
restarted `confirm` enqueues only the (arm, seed, split) runs that have no finished, waiting or
running trial.

Seeds are fresh: the sweep trained seeds base_seed .. base_seed + seeds - 1, confirm trains the
next M. Arms run seed by seed (baseline and every configuration on seed s, then s + 1), so an
interrupted confirm still holds complete pairs.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from experiments.config import compose_config
from sweeps.storage import DEFAULT_HEARTBEAT_S, fail_stale, open_storage
from sweeps.study import BASELINE, ROLE, Recipe, is_search, load
from sweeps.verdict import Paired, mean_spread, paired_t

CONFIRM = "confirm"
SUFFIX = "-confirm"


def confirm_name(study: str) -> str:
    return f"{study}{SUFFIX}"


@dataclass(frozen=True)
class Arm:
    name: str  # "baseline" or "trial-<n>"
    params: dict  # the source trial's parameters ({} for the baseline)


def top_trials(study: optuna.Study, n: int) -> list[FrozenTrial]:
    """The `n` best complete search trials (by the first objective)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if is_search(t)]
    sign = -1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1
    return sorted(done, key=lambda t: (sign * t.values[0], t.number))[:n]


def fresh_seeds(recipe: Recipe, n: int) -> list[int]:
    """`n` seeds the sweep never trained: the ones after the study's own."""
    first = recipe.base_seed + recipe.seeds
    return list(range(first, first + n))


def eval_split_for(recipe: Recipe, requested: str = "") -> tuple[str, str]:
    """(the sweep's evaluation split, confirm's): digits confirm on `test` unless told;
    elsewhere `--eval-split` is required and must differ from the sweep's."""
    cfg = compose_config(recipe.preset, recipe.overrides)
    selected = cfg.data.eval_split
    split = requested or ("test" if cfg.data.name == "digits" else "")
    if not split:
        raise ValueError(f"--eval-split is required for data.name={cfg.data.name}: name a split "
                         f"the sweep did not select on (it evaluated on {selected!r})")
    if split == selected:
        raise ValueError(f"--eval-split {split!r} is the split the sweep selected on; confirm "
                         "needs data the sweep did not see")
    return selected, split


def open_confirm(study_name: str, url: str, heartbeat: int | None = None,
                 grace: int | None = None, create: bool = False) -> optuna.Study | None:
    storage = open_storage(url, heartbeat, grace)
    name = confirm_name(study_name)
    try:
        return optuna.load_study(study_name=name, storage=storage,
                                 sampler=optuna.samplers.RandomSampler())
    except KeyError:
        if not create:
            return None
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                sampler=optuna.samplers.RandomSampler())
    study.set_user_attr("confirm_of", study_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["final CAM mIoU (confirm split)"])
    return study


def _key(t: FrozenTrial) -> tuple[str, int, str] | None:
    if "arm" not in t.user_attrs:
        return None
    return t.user_attrs["arm"], int(t.user_attrs["seed"]), t.user_attrs.get("eval_split", "")


def enqueue(cstudy: optuna.Study, arms: list[Arm], seeds: list[int], split: str) -> int:
    """Enqueue the (arm, seed) runs that have no finished, waiting or running trial."""
    live = (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    taken = {_key(t) for t in cstudy.get_trials(deepcopy=False, states=live)}
    added = 0
    for seed in seeds:
        for arm in arms:
            if (arm.name, seed, split) in taken:
                continue
            cstudy.enqueue_trial(arm.params, user_attrs={
                ROLE: CONFIRM, "arm": arm.name, "seed": seed, "eval_split": split})
            added += 1
    return added


def _waiting(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def run_confirm(study_name: str, url: str, root: str | Path, top: int = 1, n_seeds: int = 5,
                eval_split: str = "", launcher: str = "inprocess", num_processes: int = 1,
                heartbeat: int | None = DEFAULT_HEARTBEAT_S, grace: int | None = None,
                deadline: float | None = None, fail_stale_s: float | None = None) -> dict:
    """Run the confirm phase of `study_name`; returns the verdict (also written to
    `<root>/<study>/confirm/verdict.json` and `.md`). `deadline` (time.monotonic) starts no run
    that would likely overrun it."""
    from sweeps.objective import TrialRunner

    if top < 1 or n_seeds < 1:
        raise ValueError(f"--top and --seeds must be >= 1, got {top} and {n_seeds}")
    study, recipe = load(study_name, url, None)
    selected, split = eval_split_for(recipe, eval_split)
    best = top_trials(study, top)
    if not best:
        raise ValueError(f"study {study_name!r} has no complete trial to confirm yet")
    arms = [Arm(BASELINE, {})] + [Arm(f"trial-{t.number}", dict(t.params)) for t in best]
    seeds = fresh_seeds(recipe, n_seeds)
    cstudy = open_confirm(study_name, url, heartbeat or None, grace, create=True)
    cstudy.set_user_attr("splits", {"selected_on": selected, "confirmed_on": split})
    if fail_stale_s is not None:
        fail_stale(cstudy, fail_stale_s)
    if heartbeat:
        with warnings.catch_warnings():  # a killed run: failed, re-queued, resumed
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(cstudy)
    added = enqueue(cstudy, arms, seeds, split)
    print(f"confirm {study_name}: arms {[a.name for a in arms]} on seeds {seeds} "
          f"(eval split {split}; the sweep selected on {selected}); {added} runs queued")
    runner = TrialRunner(confirm_name(study_name), url, Path(root), recipe, launcher,
                         num_processes, group=study_name)
    space = recipe.parsed_space()
    base_arm = runner.baseline_arm()
    out = Path(root, study_name, CONFIRM)
    runs_dir = out / split
    longest = [0.0]

    def objective(trial: optuna.Trial) -> float:
        arm = trial.user_attrs.get("arm")
        if arm is None:  # another worker took the last queued run first
            trial.study.stop()
            raise optuna.TrialPruned("no confirm run left in the queue")
        seed = int(trial.user_attrs["seed"])
        try:
            overrides = base_arm if arm == BASELINE else space.overrides(space.sample(trial))
            return runner.train_seeds(trial, overrides, [seed], runs_dir / arm, f"confirm-{arm}",
                                      [CONFIRM, arm], extra=(f"data.eval_split={split}",))
        except BaseException as err:  # recorded, then Optuna marks the run FAIL
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}"[:2000])
            raise

    def callback(s: optuna.Study, t: FrozenTrial) -> None:
        if t.duration:
            longest[0] = max(longest[0], t.duration.total_seconds())
        if _waiting(s) == 0 or (deadline is not None
                                and time.monotonic() + longest[0] > deadline):
            s.stop()

    if _waiting(cstudy) and (deadline is None or time.monotonic() < deadline):
        cstudy.optimize(objective, n_trials=None, catch=(Exception,),
                        callbacks=[callback], gc_after_trial=True)
    result = verdict(cstudy, [a.name for a in arms], split)
    write_verdict(result, out)
    return result


def runs(cstudy: optuna.Study, split: str) -> dict[str, dict[int, FrozenTrial]]:
    """{arm: {seed: its finished trial}} of a confirm study on `split`."""
    out: dict[str, dict[int, FrozenTrial]] = {}
    for t in cstudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if (key := _key(t)) is not None and key[2] == split:
            out.setdefault(key[0], {})[key[1]] = t
    return out


def _per_seed(trials: dict[int, FrozenTrial], attr: str) -> dict[int, float]:
    values = {s: t.user_attrs.get(attr, [math.nan])[0] for s, t in trials.items()}
    return {s: v for s, v in values.items() if v is not None and math.isfinite(v)}


def verdict(cstudy: optuna.Study, arms: list[str] | None = None, split: str = "") -> dict:
    """Per configuration arm: the paired difference to the baseline in final CAM mIoU and
    pseudo-mask mIoU (mean, 95% t-interval, verdict), and each arm's mean ± sd; on `split`
    (default: the split of the latest `confirm`)."""
    splits = dict(cstudy.user_attrs.get("splits", {}))
    split = split or splits.get("confirmed_on", "")
    splits["confirmed_on"] = split
    by_arm = runs(cstudy, split)
    names = arms or sorted(by_arm, key=lambda a: (a != BASELINE, a))
    base = by_arm.get(BASELINE, {})
    result: dict = {"study": cstudy.user_attrs.get("confirm_of", cstudy.study_name),
                    "splits": splits, "interval": "95% Student t on paired differences",
                    "arms": {}}
    for name in names:
        trials = by_arm.get(name, {})
        cam, pseudo = _per_seed(trials, "cam_miou_per_seed"), _per_seed(trials,
                                                                          "pseudo_miou_per_seed")
        entry = {"seeds": sorted(trials), "cam_miou": cam, "pseudo_miou": pseudo,
                 "cam_mean_sd": mean_spread(list(cam.values())),
                 "pseudo_mean_sd": mean_spread(list(pseudo.values()))}
        if name != BASELINE:
            params = next(iter(trials.values())).params if trials else {}
            entry["params"] = params
            entry["cam_diff"] = paired_t(cam, _per_seed(base, "cam_miou_per_seed")).__dict__
            entry["pseudo_diff"] = paired_t(pseudo, _per_seed(base, "pseudo_miou_per_seed")
                                            ).__dict__
        result["arms"][name] = entry
    return result


def _ms(pair) -> str:
    mean, sd = pair
    return "-" if mean is None or not math.isfinite(mean) else f"{mean:.4f} ± {sd:.4f}"


def verdict_markdown(result: dict) -> list[str]:
    """The verdict as a markdown table (one row per arm) and a sentence on the splits."""
    splits = result.get("splits", {})
    md = ["| arm | seeds | CAM mIoU (mean ± sd) | Δ CAM mIoU vs baseline [95% CI] | verdict "
          "| pseudo-mask mIoU | Δ pseudo-mask mIoU [95% CI] | verdict |",
          "|---|---|---|---|---|---|---|---|"]
    for name, e in result["arms"].items():
        row = [name, str(len(e["seeds"])), _ms(e["cam_mean_sd"])]
        if name == BASELINE:
            row += ["(reference)", "", _ms(e["pseudo_mean_sd"]), "(reference)", ""]
        else:
            cam, pseudo = Paired(**e["cam_diff"]), Paired(**e["pseudo_diff"])
            row += [cam.as_text(), f"**{cam.verdict}**", _ms(e["pseudo_mean_sd"]),
                    pseudo.as_text(), f"**{pseudo.verdict}**"]
        md.append("| " + " | ".join(row) + " |")
    md += ["", f"Selected on split `{splits.get('selected_on', '?')}`, confirmed on split "
           f"`{splits.get('confirmed_on', '?')}` with fresh seeds; Δ = configuration minus "
           f"baseline on the same seed; interval: {result['interval']} (n = pairs). "
           "\"better\"/\"worse\": the whole interval lies above/below 0.", ""]  # list apart
    for name, e in result["arms"].items():
        if e.get("params"):
            md.append(f"- `{name}`: " + ", ".join(f"`{k}` = {_fmt(v)}"
                                                   for k, v in e["params"].items()))
    return md


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_verdict(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "verdict.json").write_text(json.dumps(result, indent=2, default=str))
    path = out / "verdict.md"
    path.write_text(f"# Confirm: {result['study']}\n\n" + "\n".join(verdict_markdown(result))
                    + "\n")
    return path
