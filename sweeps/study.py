"""Create and load studies. A study stores its own recipe (space, sampler, pruner, preset,
seeds, overrides) as user attributes, so every worker that joins it runs the same sweep.

Create a study once (`ppc-sweep create`) before starting parallel workers: two workers creating
the same study on a fresh database race on the schema.

Every study holds a control arm: `create` enqueues one trial with the user attribute
`role: baseline` (CAM only, `loss.use_ppc=false`, the study's fixed overrides and seeds). It runs,
fails, is retried and resumed like any trial, but it is no point of the search space: the
sampler and the pruner of a loaded study see the study without it (`SearchOnly`), and it never
counts as the best trial.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import asdict, dataclass, field

import optuna
import sqlalchemy.exc

from sweeps.space import Space, check_bounds, parse_space
from sweeps.storage import open_storage, storage_exists

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp")
PRUNERS = ("median", "hyperband", "none")
METRIC = "cam_miou"
# Multi-objective: final CAM mIoU (maximise) and training seconds per seed (minimise).
OBJECTIVES = {False: ("maximize",), True: ("maximize", "minimize")}
_RECIPE_KEY = "ppc_sweep"
ROLE = "role"  # user attribute of trials that are not points of the space (the baseline)
BASELINE = "baseline"
METRIC_NAMES = {False: ["final CAM mIoU"], True: ["final CAM mIoU", "train seconds per seed"]}


def is_search(trial: optuna.trial.FrozenTrial) -> bool:
    """True for a trial the sampler proposed; False for the baseline (any `role` trial)."""
    return ROLE not in trial.user_attrs


class SearchStudy(optuna.Study):
    """The study as the sampler, the pruner and the report's plots see it: the same storage,
    without `role` trials (a real `Study`, so Optuna's plots and evaluators accept it)."""

    def __init__(self, study: optuna.Study) -> None:  # a view: Study.__init__ would reload it
        self.__dict__.update(study.__dict__)

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        return [t for t in super().get_trials(deepcopy, states) if is_search(t)]

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list:
        return [t for t in super()._get_trials(deepcopy, states, use_cache) if is_search(t)]

    @property
    def best_trial(self) -> optuna.trial.FrozenTrial:
        if self._is_multi_objective():
            raise RuntimeError("best_trial is for single-objective studies; use best_trials")
        done = self.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not done:
            raise ValueError("no complete trial of the space yet")
        pick = max if self.direction == optuna.study.StudyDirection.MAXIMIZE else min
        return pick(done, key=lambda t: t.value)


def _SearchView(study: optuna.Study) -> SearchStudy:  # noqa: N802 - reads like the class
    return study if isinstance(study, SearchStudy) else SearchStudy(study)


class SearchOnly(optuna.samplers.BaseSampler):
    """Wraps a sampler: role trials get nothing sampled and are invisible to it."""

    def __init__(self, inner: optuna.samplers.BaseSampler) -> None:
        self.inner = inner

    def infer_relative_search_space(self, study, trial):
        if not is_search(trial):
            return {}
        return self.inner.infer_relative_search_space(_SearchView(study), trial)

    def sample_relative(self, study, trial, search_space):
        if not is_search(trial) or not search_space:
            return {}
        return self.inner.sample_relative(_SearchView(study), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(_SearchView(study), trial, param_name,
                                             param_distribution)

    def before_trial(self, study, trial) -> None:
        if is_search(trial):
            self.inner.before_trial(_SearchView(study), trial)

    def after_trial(self, study, trial, state, values) -> None:
        if is_search(trial):
            self.inner.after_trial(_SearchView(study), trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


class SearchOnlyPruner(optuna.pruners.BasePruner):
    """Wraps a pruner: never prunes a role trial, never compares with one."""

    def __init__(self, inner: optuna.pruners.BasePruner) -> None:
        self.inner = inner

    def prune(self, study, trial) -> bool:
        return is_search(trial) and self.inner.prune(_SearchView(study), trial)


@dataclass
class Recipe:
    """Everything a worker needs besides the storage URL."""

    space: dict
    sampler: str = "tpe"
    pruner: str = "median"
    multi_objective: bool = False
    preset: str = "digits"
    seeds: int = 1
    base_seed: int = 0
    overrides: list[str] = field(default_factory=list)
    sampler_seed: int | None = None
    prune_startup_trials: int = 2
    prune_warmup_steps: int = 0
    baseline: bool = True  # enqueue the control arm (CAM only) at create
    space_file: str = ""  # where the space came from, for error messages

    def parsed_space(self) -> Space:
        return parse_space(self.space, self.space_file or "<study space>")

    def check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"--pruner must be one of {list(PRUNERS)}, got {self.pruner!r}")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
        if self.sampler == "cmaes" and importlib.util.find_spec("cmaes") is None:
            raise ValueError("--sampler cmaes needs the `cmaes` package (pip install cmaes)")
        if self.sampler == "cmaes" and self.multi_objective:
            raise ValueError("--sampler cmaes is single-objective; use tpe, random, grid or gp")
        if self.multi_objective and self.pruner != "none":
            raise ValueError("--multi-objective cannot prune (Optuna reports are single-objective);"
                             " use --pruner none")
        space = self.parsed_space()
        if self.sampler == "grid":
            space.grid()  # raises for conditional or continuous dimensions
        clash = {o.split("=", 1)[0].lstrip("+~") for o in self.overrides} & space.fields()
        if clash:
            raise ValueError(f"overrides {sorted(clash)} are also dimensions or fixed values of the"
                             " space; drop them from the command line or from the space")
        check_bounds(space, self.preset, self.overrides)


def make_sampler(recipe: Recipe, seed: int | None = None) -> optuna.samplers.BaseSampler:
    return SearchOnly(_make_sampler(recipe, seed))


def _make_sampler(recipe: Recipe, seed: int | None = None) -> optuna.samplers.BaseSampler:
    seed = recipe.sampler_seed if seed is None else seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if recipe.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if recipe.sampler == "grid":
            return optuna.samplers.GridSampler(recipe.parsed_space().grid(), seed=seed)
        if recipe.sampler == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        if recipe.sampler == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        # multivariate + group model conditional spaces; constant_liar keeps parallel workers
        # from proposing the same point while the first is still running.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          constant_liar=True, n_startup_trials=5)


def make_pruner(recipe: Recipe) -> optuna.pruners.BasePruner:
    return SearchOnlyPruner(_make_pruner(recipe))


def _make_pruner(recipe: Recipe) -> optuna.pruners.BasePruner:
    if recipe.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=recipe.prune_startup_trials,
                                           n_warmup_steps=recipe.prune_warmup_steps)
    if recipe.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def create(name: str, storage_url: str, recipe: Recipe, heartbeat: int | None = None,
           exist_ok: bool = False) -> optuna.Study:
    """Create study `name` with `recipe` (validated first); `exist_ok` loads a matching one."""
    recipe.check()
    storage = open_storage(storage_url, heartbeat)
    directions = list(OBJECTIVES[recipe.multi_objective])
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions,
                                    sampler=make_sampler(recipe), pruner=make_pruner(recipe))
    except optuna.exceptions.DuplicatedStudyError:
        if not exist_ok:
            raise ValueError(f"study {name!r} already exists in {storage_url}; use `ppc-sweep run`"
                             " to add trials, or another --study name") from None
        return load(name, storage_url, heartbeat)[0]
    study.set_user_attr(_RECIPE_KEY, asdict(recipe))
    study.set_user_attr("metric", METRIC)
    with warnings.catch_warnings():  # experimental in Optuna 5.1; plots and dashboard read it
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(METRIC_NAMES[recipe.multi_objective])
    if recipe.baseline:  # first in the queue: the control arm runs before any point of the space
        study.enqueue_trial({}, user_attrs={ROLE: BASELINE})
    return study


def missing(name: str, storage_url: str, known: list[str] | None = None) -> str:
    """The error for a study that is not there, with the way to create it."""
    there = f"; studies there: {known}" if known else ""
    return (f"no study {name!r} in {storage_url}{there}. Create it first: ppc-sweep create "
            f"--study {name} --storage {storage_url} --space SPACE --preset PRESET [-- overrides]")


def load(name: str, storage_url: str, heartbeat: int | None = None, grace: int | None = None,
         sampler_seed: int | None = None, *, readonly: bool = False, db_wait: float = 0,
         ) -> tuple[optuna.Study, Recipe]:
    """Load study `name` and its recipe, with the sampler and pruner the recipe names.

    `readonly`: never create the storage (status, report). `db_wait`: see `open_storage`.
    """
    if not storage_exists(storage_url):
        raise ValueError(missing(name, storage_url))
    storage = open_storage(storage_url, heartbeat, grace, readonly=readonly, wait_s=db_wait)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise ValueError(missing(name, storage_url, names)) from None
    except (sqlalchemy.exc.ProgrammingError, optuna.exceptions.StorageInternalError):
        raise ValueError(missing(name, storage_url)) from None  # a database without tables
    attrs = study.user_attrs.get(_RECIPE_KEY)
    if attrs is None:
        raise ValueError(f"study {name!r} was not created by ppc-sweep (no recipe attribute)")
    recipe = Recipe(**attrs)
    study.sampler = make_sampler(recipe, sampler_seed)
    study.pruner = make_pruner(recipe)
    return study, recipe


def exists(name: str, storage_url: str) -> bool:
    """Whether study `name` is in the storage (creates nothing)."""
    try:
        load(name, storage_url, readonly=True)
    except ValueError as err:
        if str(err).startswith(f"no study {name!r}"):
            return False
        raise
    return True
