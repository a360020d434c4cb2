"""`ppc-sweep`: create, run, inspect and report hyper-parameter sweeps of PPC training.

    ppc-sweep demo                                    # the CPU demo: sweep, report, dashboard hint
    ppc-sweep create --study s --space paper --preset voc_seam_ppc -- data.root=/data/VOC2012
    ppc-sweep run --study s --n-trials 40 &           # start as many workers as you like,
    ppc-sweep run --study s --n-trials 40 &           # after `create`
    ppc-sweep status --study s
    ppc-sweep report --study s
    ppc-sweep confirm --study s --top 3 --seeds 5       # best 3 + baseline, fresh seeds, verdict
    ppc-sweep dashboard --study s

Extra Hydra overrides for every trial go after `--`. `--n-trials` is the study's target: a
worker stops once the study holds that many finished trials (parallel workers may overshoot by
the trials they already have in flight).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sweeps.space import SpaceError, load_space
from sweeps.storage import (
    DEFAULT_DB_WAIT_S,
    DEFAULT_HEARTBEAT_S,
    StorageUnavailable,
    default_url,
    fail_stale,
    has_heartbeat,
)
from sweeps.study import PRUNERS, SAMPLERS, Recipe, create, exists, load, missing
from sweeps.worker import finished, run_trials


def _common(p: argparse.ArgumentParser, study: str = "ppc") -> None:
    p.add_argument("--study", default=study, help=f"study name (default {study})")
    p.add_argument("--root", default="runs", help="output root: <root>/<study>/trial_<n>")
    p.add_argument("--storage", default="",
                   help="sqlite:///PATH, postgresql://USER@HOST:PORT/DB or journal:///PATH.log "
                        "(default sqlite:///<root>/<study>/study.db)")
    p.add_argument("--heartbeat", type=int, default=DEFAULT_HEARTBEAT_S,
                   help="seconds between trial heartbeats (SQLite/PostgreSQL; 0 = off)")
    p.add_argument("--grace", type=int, default=None,
                   help="seconds without heartbeat before a trial is failed and retried "
                        "(default 2 x heartbeat)")


def _recipe_args(p: argparse.ArgumentParser, space: str = "paper") -> None:
    p.add_argument("--space", default=space, help="space YAML file or bundled name (paper, demo)")
    p.add_argument("--preset", default="digits", help="Hydra preset (digits, voc_seam_ppc)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per trial (objective: mean)")
    p.add_argument("--base-seed", type=int, default=0)
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    p.add_argument("--pruner", choices=PRUNERS, default="median")
    p.add_argument("--multi-objective", action="store_true",
                   help="maximise CAM mIoU and minimise training seconds (no pruning)")
    p.add_argument("--sampler-seed", type=int, default=None)
    p.add_argument("--prune-startup-trials", type=int, default=2,
                   help="median pruner: trials that finish before any pruning")
    p.add_argument("--prune-warmup-steps", type=int, default=0,
                   help="median pruner: training steps before a trial can be pruned")
    p.add_argument("--no-baseline", action="store_true",
                   help="no control arm (by default the study's first trial is the CAM-only "
                        "baseline: loss.use_ppc=false, same fixed overrides and seeds)")


def _run_args(p: argparse.ArgumentParser, launcher: str = "inprocess") -> None:
    p.add_argument("--n-trials", type=int, default=20, help="the study's target of finished trials")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds after which this worker starts no new trial")
    p.add_argument("--launcher", choices=("inprocess", "torchrun", "accelerate"), default=launcher)
    p.add_argument("--num-processes", type=int, default=1,
                   help="processes per trial (torchrun / accelerate)")
    p.add_argument("--db-wait", type=float, default=DEFAULT_DB_WAIT_S, metavar="SECONDS",
                   help="how long to wait out a database outage before stopping (PostgreSQL)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppc-sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create", help="create a study (do this before starting parallel workers)")
    _common(p)
    _recipe_args(p)
    p.add_argument("--exist-ok", action="store_true", help="load the study if it exists")
    p = sub.add_parser("run", help="run a sweep worker of a study made by `create`")
    _common(p)
    _recipe_args(p)
    _run_args(p)
    p.add_argument("--create", action="store_true",
                   help="create the study first if it does not exist (with the recipe options)")
    p = sub.add_parser("status", help="trials by state and the best so far")
    _common(p)
    p.add_argument("--fail-stale", type=float, default=None, metavar="SECONDS",
                   help="fail and re-queue RUNNING trials older than SECONDS (journal storage "
                        "has no heartbeat: use this after a worker was killed)")
    p = sub.add_parser("report", help="write report.md, index.html and plots")
    _common(p)
    p.add_argument("--out", default="", help="report folder (default <root>/<study>/report)")
    p.add_argument("--no-wandb", action="store_true", help="skip the W&B summary run")
    p = sub.add_parser("export-wandb", help="write the study's recipe as a W&B sweep YAML")
    _common(p)
    p.add_argument("--space", default="",
                   help="only without a stored study: space to export (default paper)")
    p.add_argument("--preset", default="", help="only without a stored study (default digits)")
    p.add_argument("--out", default="", help="YAML path (default <root>/<study>/wandb_sweep.yaml)")
    p.add_argument("--run-local", type=int, default=0, metavar="N",
                   help="also run N proposals of W&B's own algorithm here, offline "
                        "(needs wandb[sweeps])")
    p = sub.add_parser("confirm", help="re-run the best configurations and the baseline on "
                       "fresh seeds, on a split the sweep did not select on; write a verdict")
    _common(p)
    p.add_argument("--top", type=int, default=1, help="configurations to confirm (best first)")
    p.add_argument("--seeds", type=int, default=5, help="fresh seeds per arm, paired by seed")
    p.add_argument("--eval-split", default="",
                   help="split to confirm on (digits: test by default; VOC: required, e.g. val "
                        "after selecting on train)")
    p.add_argument("--launcher", choices=("inprocess", "torchrun", "accelerate"),
                   default="inprocess")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--fail-stale", type=float, default=None, metavar="SECONDS",
                   help="first fail and re-queue confirm runs RUNNING longer than SECONDS "
                        "(journal storage, after a killed confirm)")
    p = sub.add_parser("dashboard", help="optuna-dashboard on 127.0.0.1")
    _common(p)
    p.add_argument("--port", type=int, default=8080)
    p = sub.add_parser("demo", help="the CPU demo: a small sweep on the bundled data, a report")
    _common(p, study="demo")
    _recipe_args(p, space="demo")
    p.add_argument("--n-trials", type=int, default=20, help="trials to add")
    p.add_argument("--budget", type=float, default=570.0,
                   help="seconds for the whole demo: sweep, confirm and report")
    p.add_argument("--confirm-seeds", type=int, default=3,
                   help="confirm phase: fresh seeds for the best configuration and the baseline")
    p.add_argument("--no-wandb", action="store_true", help="no W&B runs (trials or summary)")
    # The paper's regime (preset digits_pretrained: pretrained start, 8x8 loss grid, 400-step
    # trials); its CAMs localise from the start, so pruning may begin at the second evaluation.
    p.set_defaults(preset="digits_pretrained", prune_warmup_steps=200, prune_startup_trials=3)
    return parser


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _url(args) -> str:
    return args.storage or default_url(args.root, args.study)


def shown(url: str) -> str:
    """`url` for printing: a password in it becomes *** (logs are shared more than secrets)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _recipe(args, overrides: list[str]) -> Recipe:
    space = load_space(args.space)  # every space error surfaces here, before any trial
    return Recipe(space=space.to_dict(), space_file=space.path, sampler=args.sampler,
                  pruner=args.pruner,
                  multi_objective=args.multi_objective, preset=args.preset, seeds=args.seeds,
                  base_seed=args.base_seed, overrides=overrides, sampler_seed=args.sampler_seed,
                  prune_startup_trials=args.prune_startup_trials,
                  prune_warmup_steps=args.prune_warmup_steps, baseline=not args.no_baseline)


def _counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


_finished = finished


def run_worker(study_name: str, url: str, root: str, target: int, timeout: float | None = None,
               launcher: str = "inprocess", num_processes: int = 1,
               heartbeat: int | None = DEFAULT_HEARTBEAT_S, grace: int | None = None,
               deadline: float | Callable[[], float] | None = None, progress: bool = True,
               db_wait: float = DEFAULT_DB_WAIT_S) -> int:
    """Run trials of an existing study until it holds `target` finished trials; returns the
    exit status (0; 130 / 143 after SIGINT / SIGTERM; 1 when the disk or database failed).

    `deadline` (time.monotonic, or a function returning it) stops before a trial that would
    likely overrun it.
    `db_wait`: seconds each database call waits out an outage (PostgreSQL).
    """
    from tqdm.auto import tqdm

    from sweeps.objective import TrialRunner

    study, recipe = load(study_name, url, heartbeat or None, grace, db_wait=db_wait)
    objective = TrialRunner(study_name, url, Path(root), recipe, launcher, num_processes)
    if not has_heartbeat(study._storage):
        print("warning: this storage has no heartbeat; a killed worker leaves its trial RUNNING "
              "until `ppc-sweep status --fail-stale SECONDS`", file=sys.stderr)
    start = finished(study)
    if start >= target:
        return 0
    bar = tqdm(total=target, initial=min(start, target), desc=f"trials ({study_name})",
               unit="trial", disable=not progress, position=1)

    def on_trial(study, trial) -> None:
        from sweeps.report import best_trials

        bar.update(max(0, min(finished(study), target) - bar.n))
        try:  # the best search trial, never the baseline
            best = best_trials(study) if len(study.directions) == 1 else []
        except ValueError:  # no complete search trial yet
            best = []
        bar.set_postfix(best=f"{best[0].value:.4f}" if best else "")

    try:
        return run_trials(study, objective, target, timeout, deadline, on_trial)
    finally:
        bar.close()


# `run` options that a study stores at `create`: for an existing study its values win.
_STORED = {"--space": "space", "--preset": "preset", "--seeds": "seeds", "--base-seed": "base_seed",
           "--sampler": "sampler", "--pruner": "pruner", "--multi-objective": "multi_objective",
           "--prune-startup-trials": "prune_startup_trials",
           "--prune-warmup-steps": "prune_warmup_steps"}


def _note_stored_settings(args, given: Recipe, stored: Recipe) -> None:
    """Say which of the command line's recipe options the existing study overrides."""
    differ = []
    for flag, key in _STORED.items():
        if flag in args.given and getattr(given, key) != getattr(stored, key):
            shown = stored.space_file or "its stored space" if key == "space" else \
                getattr(stored, key)
            differ.append(f"{flag} {shown} (not {args.space if key == 'space' else getattr(given, key)})")
    if given.overrides and given.overrides != stored.overrides:
        differ.append(f"overrides {stored.overrides} (not {given.overrides})")
    if differ:
        print(f"note: study {args.study} exists; its stored settings win: {'; '.join(differ)}. "
              "For other settings, create a new study.", file=sys.stderr)


def _print_status(study) -> None:
    counts = _counts(study)
    print(f"study {study.study_name}: " + ", ".join(f"{k.lower()} {v}" for k, v in
                                                     sorted(counts.items())))
    from sweeps.report import best_trials

    best = best_trials(study)
    if best:
        t = best[0]
        print(f"best: trial {t.number} value {', '.join(f'{v:.4f}' for v in t.values)}")
        for k, v in t.params.items():
            print(f"  {k} = {v}")
    now = time.time()
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "RUNNING" and t.datetime_start:
            age = now - t.datetime_start.timestamp()
            print(f"running: trial {t.number} for {age:.0f} s")


def _report(study, out: Path, wandb: bool) -> Path:
    from sweeps.report import write_report

    report = write_report(study, out)
    if wandb:
        from sweeps.tracking import log_study_summary

        try:
            run_dir = log_study_summary(study, out)
            print(f"W&B summary run: {run_dir}")
        except Exception as err:  # a tracker problem must not lose the report
            print(f"warning: W&B summary run failed: {err}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    argv, overrides = _split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    args.given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    try:
        return _dispatch(args, overrides)
    except (SpaceError, ValueError) as err:
        url = _url(args)
        print(f"ppc-sweep {args.command}: error: {str(err).replace(url, shown(url))}",
              file=sys.stderr)
        return 2
    except StorageUnavailable as err:
        print(f"ppc-sweep {args.command}: error: {err}; run it again when the database is back",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside a worker (which handles its own signals)
        print(f"\nppc-sweep {args.command}: interrupted", file=sys.stderr)
        return 130


def _dispatch(args, overrides: list[str]) -> int:
    url = _url(args)
    cmd = args.command
    if cmd == "create":
        create(args.study, url, _recipe(args, overrides), exist_ok=args.exist_ok)
        print(f"created study {args.study} in {shown(url)}")
        return 0
    if cmd == "run":
        recipe = _recipe(args, overrides)  # a bad space fails here, before any storage I/O
        if not exists(args.study, url):
            if not args.create:  # a mistyped --study must not start a new sweep
                raise ValueError(missing(args.study, url) + " (or add --create to `run`)")
            create(args.study, url, recipe, exist_ok=True)  # parallel `run --create`s
        else:
            _note_stored_settings(args, recipe, load(args.study, url, readonly=True)[1])
        rc = run_worker(args.study, url, args.root, args.n_trials, args.timeout, args.launcher,
                        args.num_processes, args.heartbeat, args.grace, db_wait=args.db_wait)
        if rc == 0:
            _print_status(load(args.study, url, readonly=True)[0])
        return rc
    if cmd == "status":
        study, _ = load(args.study, url, readonly=True)
        if args.fail_stale is not None:
            failed = fail_stale(study, args.fail_stale)
            print(f"failed and re-queued stale trials: {failed}")
        _print_status(study)
        return 0
    if cmd == "report":
        study, _ = load(args.study, url, readonly=True)
        out = Path(args.out or Path(args.root, args.study, "report"))
        print(f"report: {_report(study, out, not args.no_wandb)}")
        return 0
    if cmd == "export-wandb":
        return _export(args, overrides)
    if cmd == "confirm":
        return _confirm(args, url)
    if cmd == "dashboard":
        from optuna_dashboard import run_server

        from sweeps.objective import artifact_store
        from sweeps.storage import open_storage

        print(f"optuna-dashboard on http://127.0.0.1:{args.port} (Ctrl-C to stop)")
        run_server(open_storage(url, heartbeat=None, readonly=True), host="127.0.0.1",
                   port=args.port, artifact_store=artifact_store(args.root, args.study))
        return 0
    return _demo(args, overrides, url)


def _export(args, overrides: list[str]) -> int:
    from sweeps.wandb_sweep import (
        ENGINE_MISSING,
        load_engine,
        run_local,
        to_wandb_sweep,
        write_wandb_sweep,
    )

    run_root = f"{args.root}/{args.study}"
    if exists(args.study, _url(args)):
        _, recipe = load(args.study, _url(args), None)
        if args.space or args.preset or overrides:
            print(f"note: study {args.study} exists: its stored recipe is exported, not "
                  "--space / --preset / overrides", file=sys.stderr)
        config, notes = _export_recipe(recipe, run_root)
    else:
        print(f"note: no study {args.study} in {_url(args)}: exporting --space "
              f"{args.space or 'paper'} --preset {args.preset or 'digits'}", file=sys.stderr)
        config, notes = to_wandb_sweep(load_space(args.space or "paper"),
                                       args.preset or "digits", overrides, run_root=run_root)
    path = write_wandb_sweep(config, args.out or Path(args.root, args.study, "wandb_sweep.yaml"))
    print(f"W&B sweep: {path}  (wandb sweep {path}; wandb agent ENTITY/PROJECT/SWEEP_ID)")
    for n in notes:
        print(f"note: {n}")
    if args.run_local:
        if load_engine() is None:
            print(f"skipped: {ENGINE_MISSING}")
            return 0
        for r in run_local(config, args.run_local, Path(args.root, args.study)):
            print(r)
    return 0


def _export_recipe(recipe: Recipe, run_root: str) -> tuple[dict, list[str]]:
    """The W&B sweep of a stored recipe: its space, preset, overrides, seeds and warm-up."""
    import math

    from experiments.config import compose_config
    from sweeps.wandb_sweep import to_wandb_sweep

    space = recipe.parsed_space()
    cfg = compose_config(recipe.preset, [*recipe.overrides, *space.overrides({})])
    min_iter = max(2, math.ceil(recipe.prune_warmup_steps / cfg.eval.every))
    seeds = [recipe.base_seed + i for i in range(recipe.seeds)]
    config, notes = to_wandb_sweep(space, recipe.preset, recipe.overrides, project=cfg.track.project,
                                   min_iter=min_iter, seeds=seeds, run_root=run_root)
    if recipe.multi_objective:
        notes.append("multi-objective study: W&B sweeps optimise one metric (CAM mIoU)")
    if recipe.pruner == "none":
        del config["early_terminate"]
    return config, notes


def _confirm(args, url: str, deadline: float | None = None) -> int:
    from sweeps.confirm import run_confirm, verdict_markdown

    result = run_confirm(args.study, url, args.root, args.top, args.seeds, args.eval_split,
                         getattr(args, "launcher", "inprocess"),
                         getattr(args, "num_processes", 1), args.heartbeat, args.grace,
                         deadline, getattr(args, "fail_stale", None))
    print("\n".join(verdict_markdown(result)))
    print(f"verdict: {Path(args.root, args.study, 'confirm', 'verdict.md')}")
    return 0


def _demo(args, overrides: list[str], url: str) -> int:
    """Sweep, then confirm the best configuration against the baseline on fresh seeds and the
    test split, then the report (verdict first), all within `--budget` seconds."""
    start = time.monotonic()
    reserve = 45.0  # the report, plots and the W&B summary run
    if args.no_wandb:
        overrides = [*overrides, "track.trackers=[]"]
    os.environ.setdefault("WANDB_MODE", "offline")
    recipe = _recipe(args, overrides)
    study = create(args.study, url, recipe, exist_ok=True)
    target = _finished(study) + args.n_trials
    end = start + args.budget - reserve

    def sweep_deadline() -> float:
        # Leave the confirm phase its 2 x seeds runs, each as long as a measured seed.
        return end - 2 * args.confirm_seeds * _seconds_per_seed(study) * 1.15

    print(f"demo: study {args.study} in {shown(url)}; the baseline and up to {args.n_trials} trials, "
          f"then confirm on {args.confirm_seeds} fresh seeds, in {args.budget:.0f} s "
          "(digits, CPU)")
    rc = run_worker(args.study, url, args.root, target, launcher="inprocess",
                    heartbeat=args.heartbeat, grace=args.grace, deadline=sweep_deadline)
    if rc:
        return rc
    from sweeps.confirm import run_confirm, verdict_markdown

    print(f"\nconfirm: the best configuration vs the baseline, {args.confirm_seeds} fresh seeds, "
          "test split")
    try:
        result = run_confirm(args.study, url, args.root, 1, args.confirm_seeds, "",
                             heartbeat=args.heartbeat, grace=args.grace, deadline=end)
        print("\n".join(verdict_markdown(result)))
    except ValueError as err:
        print(f"confirm skipped: {err}")
    study, _ = load(args.study, url, None)
    report = _report(study, Path(args.root, args.study, "report"), not args.no_wandb)
    _print_status(study)
    print(f"\nreport: {report}\n        {report.with_name('index.html')} (open in a browser)")
    from sweeps.report import best_checkpoint

    try:
        print(f"best checkpoint: {best_checkpoint(study)}")
    except ValueError as err:
        print(f"best checkpoint: none ({err})")
    print(f"dashboard: ppc-sweep dashboard --study {args.study} --root {args.root}  "
          f"(then open http://127.0.0.1:8080)")
    print(f"demo took {time.monotonic() - start:.0f} s")
    return 0


def _seconds_per_seed(study) -> float:
    """The longest measured training time of one seed in the study (0 before any)."""
    times = [s for t in study.get_trials(deepcopy=False)
             for s in t.user_attrs.get("seconds_per_seed", [])]
    return max(times, default=0.0)


if __name__ == "__main__":
    sys.exit(main())
