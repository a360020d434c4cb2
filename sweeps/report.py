"""Per-study report made for comparing: the confirm verdict first (baseline vs the best
configurations, paired, on a split the sweep did not select on), then the sweep's own baseline
vs best, importances, captioned plots, overlays and the trial table.

Writes `<out>/report.md` and `<out>/index.html` (the same markdown rendered to HTML, with the
PNGs beside it); `best_checkpoint` finds the best trial's checkpoint directory in one call.
The baseline trial (`role: baseline`) never counts as best and is left out of the plots of the
space; the history plot draws it as a band (mean ± sd over its seeds).
"""

from __future__ import annotations

import html
import math
import statistics
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written on headless machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from ppc_core.checkpoint import latest_checkpoint  # noqa: E402
from sweeps.study import BASELINE, METRIC_NAMES, ROLE, SearchStudy, is_search  # noqa: E402

# PED-ANOVA (Optuna 5.1's default evaluator) ranks parameters by how the best quantile of
# trials differs from all: with a handful of trials that quantile is one or two points.
MIN_IMPORTANCE_TRIALS = 10


def search_trials(study: optuna.Study, states=(TrialState.COMPLETE,)) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=states) if is_search(t)]


def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    """The study's finished baseline trial (the latest, if retried), or None."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get(ROLE) == BASELINE]
    return done[-1] if done else None


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best search trial (single objective) or the Pareto front (multi-objective); [] if
    none. The baseline is never among them."""
    if not search_trials(study):
        return []
    view = SearchStudy(study)
    return view.best_trials if len(study.directions) > 1 else [view.best_trial]


def metric_names(study: optuna.Study) -> list[str]:
    return study.metric_names or METRIC_NAMES[len(study.directions) > 1]


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
    """Parameter importances (PED-ANOVA, Optuna's default evaluator) of the first objective, or
    {} and the reason they are not given (fewer than MIN_IMPORTANCE_TRIALS complete trials)."""
    done = search_trials(study)
    if len(done) < MIN_IMPORTANCE_TRIALS:
        return {}, (f"Importances are not given: they need at least {MIN_IMPORTANCE_TRIALS} "
                    f"complete trials to mean anything, this study has {len(done)}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            copy = SearchStudy(study)
            target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
            return dict(optuna.importance.get_param_importances(
                copy, evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
                target=target)), ""
    except (RuntimeError, ValueError, ZeroDivisionError) as err:
        return {}, f"Importances unavailable: {err}"


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _plots(study: optuna.Study, out: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    vm = optuna.visualization.matplotlib
    copy = SearchStudy(study)
    name = metric_names(study)[0]
    multi = len(study.directions) > 1
    target = {"target": (lambda t: t.values[0]), "target_name": name} if multi else \
        {"target_name": name}
    base = baseline_trial(study)
    n_search = len(search_trials(study))

    def history():
        # Drawn here: Optuna's own plot indexes values by trial number, which a study with a
        # baseline trial breaks (and it has no band).
        done = search_trials(study)
        xs = [t.number for t in done]
        ys = [t.values[0] for t in done]
        pick = max if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else min
        best = [pick(ys[: i + 1]) for i in range(len(ys))]
        fig, ax = plt.subplots(figsize=(8, 5))
        ax.scatter(xs, ys, color="tab:blue", label=f"{name} of a trial", zorder=3)
        ax.step(xs, best, where="post", color="tab:red", label="best so far")
        if base is not None and base.user_attrs.get("cam_miou_per_seed"):
            m, sd = _mean_sd(base.user_attrs["cam_miou_per_seed"])
            ax.axhspan(m - sd, m + sd, color="tab:grey", alpha=0.3,
                       label=f"baseline (CAM only): {m:.4f} ± {sd:.4f}")
            ax.axhline(m, color="tab:grey", lw=1)
        ax.set(xlabel="trial number", ylabel=name, title="Optimization history")
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        return ax

    plots = {
        "history": (history, f"{name} of each trial in order of its number, the best so far "
                    "as a line; the grey band is the baseline (CAM only, the study's seeds): "
                    "mean ± sd over seeds."),
        "parallel_coordinate": (lambda: vm.plot_parallel_coordinate(copy, **target),
                                f"Each complete trial as a line through its parameters, "
                                f"coloured by {name}."),
        "slice": (lambda: vm.plot_slice(copy, **target),
                  f"{name} against each parameter; colour: trial number."),
        "intermediate": (lambda: vm.plot_intermediate_values(copy),
                         "The evaluations each trial reported while training (what the pruner "
                         "compared)."),
    }
    if multi:
        plots["pareto_front"] = (lambda: vm.plot_pareto_front(copy, target_names=metric_names(
            study)), "Pareto front of the two objectives.")
    written, skipped = [], []
    if n_search < 2:
        return [], [f"plots need at least 2 complete trials, have {n_search}"]
    for stem, (plot, caption) in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            if not hasattr(ax, "flat") and len(fig.axes) == 1:  # one plain panel: room to read
                fig.set_size_inches(max(fig.get_figwidth(), 8), max(fig.get_figheight(), 5))
            elif hasattr(ax, "flat"):  # panels keep their figure fractions: widen, no re-layout
                fig.set_size_inches(max(fig.get_figwidth(), 3.5 * ax.size + 1),
                                    fig.get_figheight())
            path = out / f"{stem}.png"
            # Optuna lays out multi-panel plots and their colour bars itself; a tight bounding
            # box keeps that layout (resizing + tight_layout put the colour bar over a panel).
            fig.savefig(path, dpi=90, bbox_inches="tight")
            plt.close(fig)
            written.append((path, caption))
        except Exception as err:  # a plot needing more trials must not stop the report
            plt.close("all")
            skipped.append(f"{stem}: {type(err).__name__}: {err}")
    return written, skipped


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def trial_rows(study: optuna.Study) -> tuple[list[str], list[list[str]]]:
    trials = study.get_trials(deepcopy=False)
    names = sorted({p for t in trials for p in t.params})
    header = ["#", "role", "state", "value", "train s", *names, "W&B runs", "note"]
    rows = []
    for t in trials:
        value = ", ".join(_fmt(v) for v in t.values) if t.values else ""
        note = t.user_attrs.get("fail_reason", "")
        if t.state == TrialState.PRUNED and t.intermediate_values:
            note = f"pruned at step {max(t.intermediate_values)}"
        if (origin := t.system_attrs.get("failed_trial")) is not None:
            note = f"retry of #{origin}; {note}".strip("; ")
        rows.append([str(t.number), t.user_attrs.get(ROLE, "search"), t.state.name, value,
                     _fmt(t.user_attrs.get("train_seconds", "")),
                     *[_fmt(t.params[n]) if n in t.params else "-" for n in names],
                     " ".join(t.user_attrs.get("wandb_runs", [])),
                     note.splitlines()[0][:120] if note else ""])
    return header, rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(c: str) -> str:
        return c.replace("|", "\\|") or " "

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]


def _arm_row(label: str, t: FrozenTrial) -> list[str]:
    finals = t.user_attrs.get("cam_miou_per_seed", [])
    m, sd = _mean_sd(finals) if finals else (math.nan, math.nan)
    pseudo = [v for v in t.user_attrs.get("pseudo_miou_per_seed", []) if math.isfinite(v)]
    pm = f"{_mean_sd(pseudo)[0]:.4f}" if pseudo else "-"
    return [label, str(t.number), f"{m:.4f} ± {sd:.4f}", str(len(finals)),
            ", ".join(f"{v:.4f}" for v in finals), pm,
            " ".join(t.user_attrs.get("wandb_runs", [])) or "-"]


def _verdict_section(study: optuna.Study) -> list[str]:
    from sweeps.confirm import confirm_name, verdict, verdict_markdown

    try:
        cstudy = optuna.load_study(study_name=confirm_name(study.study_name),
                                   storage=study._storage)
    except KeyError:
        cstudy = None
    md = ["## Verdict: the best configurations vs the baseline (confirm)", ""]
    if cstudy is None or not cstudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return md + [f"No confirm run yet: `ppc-sweep confirm --study {study.study_name}` "
                     "re-runs the best configurations and the baseline on fresh seeds, on a "
                     "split the sweep did not select on, and writes the verdict here.", ""]
    return md + verdict_markdown(verdict(cstudy)) + [""]


def _overlays(study: optuna.Study, out: Path, best: list[FrozenTrial]) -> list[str]:
    """Best and baseline overlays side by side (annotated copies in the report folder)."""
    from PIL import Image

    from ppc_core.viz import overlay_figure

    cells = []
    for label, t in (("best trial", best[0] if best else None),
                     ("baseline", baseline_trial(study))):
        src = Path(t.user_attrs.get("best_run_dir", ""), "overlays.png") if t else None
        if src is None or not src.is_file():
            continue
        stem = "best_overlays" if label == "best trial" else "baseline_overlays"
        overlay_figure(np.asarray(Image.open(src).convert("RGB")), _class_names(study),
                       out / f"{stem}.png")
        cells.append((label, t.number, f"{stem}.png"))
    if not cells:
        return []
    md = ["## Overlays: best trial and baseline", "",
          "| " + " | ".join(f"{label} (trial {n})" for label, n, _ in cells) + " |",
          "|" + "---|" * len(cells),
          "| " + " | ".join(f"![{stem[:-4]}]({stem})" for _, _, stem in cells) + " |", "",
          "*Evaluation images of each arm's best seed: the image, the ground truth, the CAM "
          "(maximum over classes, jet colours) and the pseudo mask; colours as in the legend.*",
          ""]
    return md


def _class_names(study: optuna.Study) -> list[str]:
    recipe = study.user_attrs.get("ppc_sweep")
    if not recipe:
        return []
    try:
        from experiments.config import compose_config
        from ppc_core.data import dataset_info

        cfg = compose_config(recipe["preset"], recipe.get("overrides", []))
        return list(dataset_info(cfg.data.name).class_names)
    except Exception:  # the report must not fail on a preset it cannot compose here
        return []


def write_report(study: optuna.Study, out: str | Path) -> Path:
    """Write the report into `out`; returns the path of report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    best = best_trials(study)
    base = baseline_trial(study)
    imps, why = importances(study)
    pngs, skipped = _plots(study, out)
    counts = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    name = metric_names(study)[0]
    recipe = study.user_attrs.get("ppc_sweep", {})

    md = [f"# Sweep report: {study.study_name}", ""]
    md.append(f"Objective: **{name}** (the last evaluation of each run, mean over the study's "
              f"{recipe.get('seeds', '?')} seed(s); preset `{recipe.get('preset', '?')}`). "
              "Trials: " + ", ".join(f"{k.lower()} {v}" for k, v in counts.items() if v) + ".")
    md.append("")
    md += _verdict_section(study)
    md += ["## Baseline vs best trial (the sweep's own seeds and split)", ""]
    arms = ([_arm_row("baseline (CAM only)", base)] if base else []) + \
        ([_arm_row("best trial", best[0])] if best else [])
    if arms:
        md += _table(["arm", "trial", f"{name} (mean ± sd)", "seeds", "per seed",
                      "pseudo-mask mIoU", "W&B runs (project/id)"], arms)
        md += ["", "*The best trial was selected on this split, so its lead here is optimistic; "
               "the verdict above is measured on fresh seeds and another split.*", ""]
    if not base:
        md += ["The baseline trial has not finished yet.", ""]
    if best:
        t = best[0]
        md += ["## Best trial", "", f"Trial {t.number}: {name} "
               f"{', '.join(_fmt(v) for v in t.values)}"]
        md += [f"- `{k}` = {_fmt(v)}" for k, v in t.params.items()]
        try:
            md.append(f"- checkpoint: `{best_checkpoint(study)}`")
        except ValueError as err:
            md.append(f"- checkpoint: none ({err})")
        if len(best) > 1:
            md.append(f"- Pareto front: trials {[b.number for b in best]}")
        md.append("")
    else:
        md += ["No complete trial of the space yet.", ""]
    md += ["## Parameter importances", "",
           "Evaluator: PED-ANOVA (`optuna.importance.PedAnovaImportanceEvaluator`, Optuna's "
           f"default), on {name}.", ""]
    md += [f"- `{k}`: {v:.2f}" for k, v in imps.items()] or [why]
    md += [""] + _overlays(study, out, best)
    md += ["## Plots", ""]
    for path, caption in pngs:
        md += [f"![{path.stem}]({path.name})", "", f"*{caption}*", ""]
    if skipped:
        md += ["Skipped plots:", ""] + [f"- {s}" for s in skipped] + [""]
    header, rows = trial_rows(study)
    md += ["## Trials", ""] + _table(header, rows)
    report = out / "report.md"
    text = "\n".join(md) + "\n"
    report.write_text(text)
    _write_html(out / "index.html", study.study_name, text)
    return report


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 6px;"
        "font-size:90%}img{max-width:100%}em{color:#444}")


def _write_html(path: Path, name: str, text: str) -> None:
    import markdown

    body = markdown.markdown(text, extensions=["tables"], output_format="html")
    path.write_text(f"<!doctype html><html><head><meta charset=utf-8><title>Sweep report: "
                    f"{html.escape(name)}</title><style>{_CSS}</style></head><body>\n{body}\n"
                    "</body></html>\n")
