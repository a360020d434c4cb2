"""`ppc-sweep`: create, run, inspect and report hyper-parameter sweeps of PPC training.

    ppc-sweep demo                                    # the CPU demo: sweep, report, dashboard hint
    ppc-sweep create --study s --space paper --preset voc_seam_ppc -- data.root=/data/VOC2012
    ppc-sweep run --study s --n-trials 40 &           # start as many workers as you like,
    ppc-sweep run --study s --n-trials 40 &           # after `create`
    ppc-sweep status --study s
    ppc-sweep report --study s
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
from pathlib import Path

from sweeps.space import SpaceError, load_space
from sweeps.storage import DEFAULT_HEARTBEAT_S, default_url, fail_stale, has_heartbeat
from sweeps.study import PRUNERS, SAMPLERS, Recipe, create, exists, load

FINISHED = ("COMPLETE", "PRUNED", "FAIL")


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


def _run_args(p: argparse.ArgumentParser, launcher: str = "inprocess") -> None:
    p.add_argument("--n-trials", type=int, default=20, help="the study's target of finished trials")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds after which this worker starts no new trial")
    p.add_argument("--launcher", choices=("inprocess", "torchrun", "accelerate"), default=launcher)
    p.add_argument("--num-processes", type=int, default=1,
                   help="processes per trial (torchrun / accelerate)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppc-sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create", help="create a study (do this before starting parallel workers)")
    _common(p)
    _recipe_args(p)
    p.add_argument("--exist-ok", action="store_true", help="load the study if it exists")
    p = sub.add_parser("run", help="run a sweep worker (creates the study if missing)")
    _common(p)
    _recipe_args(p)
    _run_args(p)
    p = sub.add_parser("status", help="trials by state and the best so far")
    _common(p)
    p.add_argument("--fail-stale", type=float, default=None, metavar="SECONDS",
                   help="fail and re-queue RUNNING trials older than SECONDS (journal storage "
                        "has no heartbeat: use this after a worker was killed)")
    p = sub.add_parser("report", help="write report.md, index.html and plots")
    _common(p)
    p.add_argument("--out", default="", help="report folder (default <root>/<study>/report)")
    p.add_argument("--no-wandb", action="store_true", help="skip the W&B summary run")
    p = sub.add_parser("export-wandb", help="write the space as a W&B sweep YAML")
    _common(p)
    p.add_argument("--space", default="paper")
    p.add_argument("--preset", default="digits")
    p.add_argument("--out", default="", help="YAML path (default <root>/<study>/wandb_sweep.yaml)")
    p.add_argument("--run-local", type=int, default=0, metavar="N",
                   help="also run N proposals of W&B's own algorithm here, offline "
                        "(needs wandb[sweeps])")
    p = sub.add_parser("dashboard", help="optuna-dashboard on 127.0.0.1")
    _common(p)
    p.add_argument("--port", type=int, default=8080)
    p = sub.add_parser("demo", help="the CPU demo: a small sweep on the bundled data, a report")
    _common(p, study="demo")
    _recipe_args(p, space="demo")
    p.add_argument("--n-trials", type=int, default=20, help="trials to add")
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds for the whole demo, report included")
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


def _recipe(args, overrides: list[str]) -> Recipe:
    space = load_space(args.space)  # every space error surfaces here, before any trial
    return Recipe(space=space.to_dict(), sampler=args.sampler, pruner=args.pruner,
                  multi_objective=args.multi_objective, preset=args.preset, seeds=args.seeds,
                  base_seed=args.base_seed, overrides=overrides, sampler_seed=args.sampler_seed,
                  prune_startup_trials=args.prune_startup_trials,
                  prune_warmup_steps=args.prune_warmup_steps)


def _counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _finished(study) -> int:
    """Finished trials, not counting failed ones that were re-queued (their retry counts)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}
    retried |= {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return sum(t.state.name in FINISHED and not (t.state.name == "FAIL" and t.number in retried)
               for t in trials)


def run_worker(study_name: str, url: str, root: str, target: int, timeout: float | None = None,
               launcher: str = "inprocess", num_processes: int = 1,
               heartbeat: int | None = DEFAULT_HEARTBEAT_S, grace: int | None = None,
               deadline: float | None = None, progress: bool = True) -> None:
    """Run trials of an existing study until it holds `target` finished trials.

    `deadline` (time.monotonic) stops before a trial that would likely overrun it.
    """
    import optuna
    from tqdm.auto import tqdm

    from sweeps.objective import TrialRunner

    study, recipe = load(study_name, url, heartbeat or None, grace)
    objective = TrialRunner(study_name, url, Path(root), recipe, launcher, num_processes)
    if not has_heartbeat(study._storage):
        print("warning: this storage has no heartbeat; a killed worker leaves its trial RUNNING "
              "until `ppc-sweep status --fail-stale SECONDS`", file=sys.stderr)
    start = _finished(study)
    bar = tqdm(total=target, initial=min(start, target), desc=f"trials ({study_name})",
               unit="trial", disable=not progress, position=1)
    longest = [0.0]

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done = _finished(study)
        bar.update(max(0, min(done, target) - bar.n))
        if trial.duration:
            longest[0] = max(longest[0], trial.duration.total_seconds())
        try:
            bar.set_postfix(best=f"{study.best_value:.4f}" if len(study.directions) == 1 else "")
        except ValueError:
            pass
        if done >= target:
            study.stop()
        elif deadline is not None and time.monotonic() + longest[0] > deadline:
            study.stop()

    if start < target:
        try:
            study.optimize(objective, n_trials=None, timeout=timeout, catch=(Exception,),
                           callbacks=[callback], gc_after_trial=True)
        finally:
            bar.close()
    else:
        bar.close()


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
    try:
        return _dispatch(args, overrides)
    except (SpaceError, ValueError) as err:
        print(f"ppc-sweep {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the running trial was recorded FAIL (its checkpoints stay); "
              "the study is consistent. Run the same command to continue the sweep.", file=sys.stderr)
        return 130


def _dispatch(args, overrides: list[str]) -> int:
    url = _url(args)
    cmd = args.command
    if cmd == "create":
        create(args.study, url, _recipe(args, overrides), exist_ok=args.exist_ok)
        print(f"created study {args.study} in {url}")
        return 0
    if cmd == "run":
        recipe = _recipe(args, overrides)  # a bad space fails here, before any storage I/O
        if not exists(args.study, url):
            create(args.study, url, recipe, exist_ok=True)
        elif overrides:
            print("note: the study exists; its recipe's overrides apply, not these", file=sys.stderr)
        run_worker(args.study, url, args.root, args.n_trials, args.timeout, args.launcher,
                   args.num_processes, args.heartbeat, args.grace)
        _print_status(load(args.study, url, None)[0])
        return 0
    if cmd == "status":
        study, _ = load(args.study, url, None)
        if args.fail_stale is not None:
            failed = fail_stale(study, args.fail_stale)
            print(f"failed and re-queued stale trials: {failed}")
        _print_status(study)
        return 0
    if cmd == "report":
        study, _ = load(args.study, url, None)
        out = Path(args.out or Path(args.root, args.study, "report"))
        print(f"report: {_report(study, out, not args.no_wandb)}")
        return 0
    if cmd == "export-wandb":
        return _export(args, overrides)
    if cmd == "dashboard":
        from optuna_dashboard import run_server

        from sweeps.storage import open_storage

        print(f"optuna-dashboard on http://127.0.0.1:{args.port} (Ctrl-C to stop)")
        run_server(open_storage(url, heartbeat=None), host="127.0.0.1", port=args.port)
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

    config, notes = to_wandb_sweep(load_space(args.space), args.preset, overrides)
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


def _demo(args, overrides: list[str], url: str) -> int:
    start = time.monotonic()
    reserve = 45.0  # the report, plots and the W&B summary run
    if args.no_wandb:
        overrides = [*overrides, "track.trackers=[]"]
    os.environ.setdefault("WANDB_MODE", "offline")
    recipe = _recipe(args, overrides)
    study = create(args.study, url, recipe, exist_ok=True)
    target = _finished(study) + args.n_trials
    print(f"demo: study {args.study} in {url}; up to {args.n_trials} trials in "
          f"{args.budget:.0f} s (digits, CPU)")
    run_worker(args.study, url, args.root, target, launcher="inprocess",
               heartbeat=args.heartbeat, grace=args.grace,
               deadline=start + args.budget - reserve)
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


if __name__ == "__main__":
    sys.exit(main())
