"""Per-study report: best parameters, importances, plots (PNG), a trial table, the best overlays.

Writes `<out>/report.md` and `<out>/index.html` (which embeds the PNGs); `best_checkpoint`
finds the best trial's checkpoint directory in one call.
"""

from __future__ import annotations

import html
import math
import shutil
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written on headless machines

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from ppc_core.checkpoint import latest_checkpoint  # noqa: E402


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (single objective) or the Pareto front (multi-objective); [] if none."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    return study.best_trials if len(study.directions) > 1 else [study.best_trial]


def best_checkpoint(study: optuna.Study) -> Path:
    """The checkpoint directory of the best trial (its best seed's last checkpoint)."""
    best = best_trials(study)
    if not best:
        raise ValueError(f"study {study.study_name!r} has no complete trial yet")
    t = best[0]
    ckpt = t.user_attrs.get("checkpoint_dir")
    if ckpt:
        return Path(ckpt)
    found = latest_checkpoint(t.user_attrs.get("best_run_dir", t.user_attrs.get("output_dir", "")))
    if found is None:
        raise ValueError(f"trial {t.number} recorded no checkpoint directory")
    return found


def importances(study: optuna.Study) -> tuple[dict[str, float], str]:
    """Parameter importances (fANOVA), or {} and the reason they cannot be computed."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2:
        return {}, f"importances need at least 2 complete trials, have {len(done)}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
            return dict(optuna.importance.get_param_importances(study, target=target)), ""
    except (RuntimeError, ValueError, ZeroDivisionError) as err:
        return {}, f"importances unavailable: {err}"


def _plots(study: optuna.Study, out: Path) -> tuple[list[Path], list[str]]:
    vm = optuna.visualization.matplotlib
    multi = len(study.directions) > 1
    target = {"target": (lambda t: t.values[0]), "target_name": "cam_miou"} if multi else {}
    plots = {
        "history": lambda: vm.plot_optimization_history(study, **target),
        "parallel_coordinate": lambda: vm.plot_parallel_coordinate(study, **target),
        "slice": lambda: vm.plot_slice(study, **target),
        "importances": lambda: vm.plot_param_importances(study, **target),
        "intermediate": lambda: vm.plot_intermediate_values(study),
    }
    if multi:
        plots["pareto_front"] = lambda: vm.plot_pareto_front(
            study, target_names=["cam_miou", "train seconds"])
    written, skipped = [], []
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(max(fig.get_figwidth(), 8), max(fig.get_figheight(), 5))
            with warnings.catch_warnings():  # some plots carry colour-bar axes
                warnings.simplefilter("ignore")
                fig.tight_layout()
            path = out / f"{name}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
        except Exception as err:  # a plot needing more trials must not stop the report
            plt.close("all")
            skipped.append(f"{name}: {type(err).__name__}: {err}")
    return written, skipped


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def trial_rows(study: optuna.Study) -> tuple[list[str], list[list[str]]]:
    trials = study.get_trials(deepcopy=False)
    names = sorted({p for t in trials for p in t.params})
    header = ["#", "state", "value", "train s", *names, "note"]
    rows = []
    for t in trials:
        value = ", ".join(_fmt(v) for v in t.values) if t.values else ""
        note = t.user_attrs.get("fail_reason", "")
        if t.state == TrialState.PRUNED and t.intermediate_values:
            note = f"pruned at step {max(t.intermediate_values)}"
        if (origin := t.system_attrs.get("failed_trial")) is not None:
            note = f"retry of #{origin}; {note}".strip("; ")
        rows.append([str(t.number), t.state.name, value,
                     _fmt(t.user_attrs.get("train_seconds", "")),
                     *[_fmt(t.params[n]) if n in t.params else "-" for n in names],
                     note.splitlines()[0][:120] if note else ""])
    return header, rows


def write_report(study: optuna.Study, out: str | Path) -> Path:
    """Write the report into `out`; returns the path of report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    best = best_trials(study)
    imps, why = importances(study)
    pngs, skipped = _plots(study, out)
    overlays = None
    if best and (src := Path(best[0].user_attrs.get("best_run_dir", ""), "overlays.png")).is_file():
        overlays = out / "best_overlays.png"
        shutil.copyfile(src, overlays)
        pngs.append(overlays)
    counts = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1

    md = [f"# Sweep report: {study.study_name}", ""]
    md.append("Trials: " + ", ".join(f"{k.lower()} {v}" for k, v in counts.items() if v))
    md.append("")
    if best:
        t = best[0]
        md += ["## Best trial", "",
               f"Trial {t.number}: value {', '.join(_fmt(v) for v in t.values)} "
               f"(objective: final CAM mIoU, mean over seeds"
               f"{'; and training seconds' if len(best[0].values) > 1 else ''})"]
        if "cam_miou_per_seed" in t.user_attrs:
            md.append(f"- per seed: {[round(v, 4) for v in t.user_attrs['cam_miou_per_seed']]}, "
                      f"std {_fmt(t.user_attrs.get('cam_miou_std', math.nan))}")
        md += [f"- `{k}` = {_fmt(v)}" for k, v in t.params.items()]
        try:
            md.append(f"- checkpoint: `{best_checkpoint(study)}`")
        except ValueError as err:
            md.append(f"- checkpoint: none ({err})")
        if len(best) > 1:
            md.append(f"- Pareto front: trials {[b.number for b in best]}")
        md.append("")
    else:
        md += ["No complete trial yet.", ""]
    md += ["## Parameter importances", ""]
    md += [f"- `{k}`: {v:.3f}" for k, v in imps.items()] or [f"({why})"]
    md += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    if skipped:
        md += ["", "Skipped plots:"] + [f"- {s}" for s in skipped]
    header, rows = trial_rows(study)
    md += ["", "## Trials", "", "| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    report = out / "report.md"
    report.write_text("\n".join(md) + "\n")
    _write_html(out / "index.html", study.study_name, md[: md.index("## Plots")], pngs,
                header, rows)
    return report


def _write_html(path: Path, name: str, summary: list[str], pngs: list[Path], header: list[str],
                rows: list[list[str]]) -> None:
    esc = html.escape
    body = [f"<h1>Sweep report: {esc(name)}</h1>", "<pre>" + esc("\n".join(summary)) + "</pre>"]
    body += [f'<figure><img src="{esc(p.name)}" alt="{esc(p.stem)}"><figcaption>{esc(p.stem)}'
             "</figcaption></figure>" for p in pngs]
    body.append("<table border=1 cellpadding=3><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)
                + "</tr>")
    body += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
    body.append("</table>")
    path.write_text("<!doctype html><meta charset=utf-8><title>" + esc(name) + "</title>\n"
                    + "\n".join(body) + "\n")
