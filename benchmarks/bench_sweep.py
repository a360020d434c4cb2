"""Sweep orchestration benchmark: `python -m benchmarks.bench_sweep`.

1. Overhead per trial: a trial's wall time minus the time spent training
   (experiments.train.run), on SQLite and on a throwaway PostgreSQL cluster (when the server
   binaries exist). Target: < 1 s.
2. Trials per hour with and without the median pruner at an equal time budget.

Tiny digits runs (a few seconds each), in-process launcher, one CPU thread. Prints markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sweeps.cli import run_worker
from sweeps.space import parse_space
from sweeps.storage import default_url
from sweeps.study import Recipe, create

TINY = {"train.steps": 6, "eval.every": 2, "data.num_images": 32, "data.eval_images": 16,
        "train.batch_size": 4, "eval.batch_size": 16, "train.checkpoint_every": 6}
PARAMS = {"ppc.tau": {"type": "float", "low": 0.03, "high": 0.5, "log": True},
          "optim.lr": {"type": "float", "low": 1e-4, "high": 0.3, "log": True}}


def _recipe(pruner: str) -> Recipe:
    space = parse_space({"fixed": TINY, "params": PARAMS}).to_dict()
    return Recipe(space=space, sampler="random", pruner=pruner, sampler_seed=0,
                  overrides=["track.trackers=[]"], prune_startup_trials=2)


def _sweep(url: str, root: Path, name: str, pruner: str, trials: int | None,
           budget: float | None) -> tuple[optuna.Study, float]:
    study = create(name, url, _recipe(pruner))
    tic = time.perf_counter()
    run_worker(name, url, str(root), target=trials or 10**6, timeout=budget, progress=False)
    return study, time.perf_counter() - tic


def overhead(url: str, root: Path, name: str, trials: int) -> dict:
    study, wall = _sweep(url, root, name, "none", trials, None)
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    train = [t.user_attrs["train_seconds"] for t in done]
    per_trial = [t.duration.total_seconds() - t.user_attrs["train_seconds"] for t in done]
    return {"trials": len(done), "train_s": statistics.fmean(train),
            "overhead_trial_s": statistics.fmean(per_trial),
            "overhead_worker_s": (wall - sum(train)) / len(done)}


@contextlib.contextmanager
def postgres() -> Iterator[str | None]:
    """A throwaway PostgreSQL cluster on a free loopback port, or None without server binaries."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = bins[-1] if bins else shutil.which("initdb")
    if not initdb:
        yield None
        return
    bindir, root = Path(initdb).parent, Path(tempfile.mkdtemp(prefix="ppc-pg-bench-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "start", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "b")
        yield f"postgresql://postgres@127.0.0.1:{port}/b"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def throughput(root: Path, budget: float) -> list[dict]:
    rows = []
    for pruner in ("none", "median"):
        name = f"tp_{pruner}"
        study, wall = _sweep(default_url(root, name), root, name, pruner, None, budget)
        trials = study.get_trials()
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        rows.append({"pruner": pruner, "finished": len(finished), "wall_s": wall,
                     "pruned": sum(t.state == TrialState.PRUNED for t in trials),
                     "per_hour": 3600 * len(finished) / wall,
                     "best": max((t.value for t in trials if t.value is not None), default=None)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6, help="trials per overhead measurement")
    parser.add_argument("--budget", type=float, default=90.0, help="seconds per throughput sweep")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        root = Path(tmp)
        results = {"SQLite": overhead(default_url(root, "ov_sqlite"), root, "ov_sqlite",
                                      args.trials)}
        if not args.no_postgres:
            with postgres() as url:
                if url:
                    results["PostgreSQL"] = overhead(url, root, "ov_pg", args.trials)
                else:
                    print("PostgreSQL: no server binaries, skipped")
        print(f"\n### Orchestration overhead per trial ({args.trials} tiny trials, in-process)\n")
        print("| storage | trials | training s / trial | overhead s / trial (trial record) "
              "| overhead s / trial (worker wall) |")
        print("|---|---|---|---|---|")
        for k, r in results.items():
            print(f"| {k} | {r['trials']} | {r['train_s']:.2f} | {r['overhead_trial_s']:.3f} | "
                  f"{r['overhead_worker_s']:.3f} |")
        rows = throughput(root, args.budget)
        print(f"\n### Trials per hour at an equal budget ({args.budget:.0f} s each, "
              f"{TINY['train.steps']} steps, evaluation every {TINY['eval.every']})\n")
        print("| pruner | finished trials | pruned | wall s | trials / hour | best CAM mIoU |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            best = f"{r['best']:.4f}" if r["best"] is not None else "-"
            print(f"| {r['pruner']} | {r['finished']} | {r['pruned']} | {r['wall_s']:.0f} | "
                  f"{r['per_hour']:.0f} | {best} |")


if __name__ == "__main__":
    main()
