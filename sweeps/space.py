"""Search spaces: a YAML file of named dimensions over `RunConfig` fields, validated up front.

A space file::

    fixed:                       # set in every trial (Hydra overrides)
      loss.use_ppc: true
    params:                      # sampled in file order
      ppc.tau: {type: float, low: 0.03, high: 0.3, log: true}
      ppc.neg_drop: {type: int, low: 0, high: 6, when: {ppc.w_intra: {gt: 0}}}
      ppc_weight:                # a free name ties one value to several fields
        {type: float, low: 0.01, high: 1.0, log: true,
         targets: [ppc.w_cross_proto, ppc.w_cross_cam, ppc.w_intra]}

`when` is a condition on parameters sampled earlier in the file or fixed: a plain value means
equality, a mapping one of `eq ne gt ge lt le in`. A dimension whose condition is false is not
sampled and its fields keep the preset's values.
"""

from __future__ import annotations

import math
import operator
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from experiments.config import RunConfig

SPACES_DIR = Path(__file__).resolve().parent / "spaces"
TYPES = ("float", "int", "categorical")
_KEYS = {"type", "low", "high", "log", "step", "choices", "when", "targets", "grid"}
_OPS = {"eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "ge": operator.ge,
        "lt": operator.lt, "le": operator.le, "in": lambda a, b: a in b}


class SpaceError(ValueError):
    """A search-space file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Dimension:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = ()
    grid: tuple = ()

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.type == "categorical":
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.type == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                        step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log,
                                                      step=self.step)

    def grid_values(self) -> list:
        """The values a grid search visits: `grid`, the choices, or low..high by `step`."""
        if self.grid:
            return list(self.grid)
        if self.type == "categorical":
            return list(self.choices)
        if self.step is None and self.type == "float":
            raise SpaceError(f"{self.name}: a grid search needs `grid:` values or a `step`")
        step = self.step or 1
        n = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + i * step for i in range(n)]
        return [int(v) for v in values] if self.type == "int" else values


@dataclass(frozen=True)
class Space:
    path: str
    params: tuple[Dimension, ...]
    fixed: dict[str, Any]

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.params]

    def fields(self) -> set[str]:
        """Every RunConfig field this space sets."""
        out = set(self.fixed)
        for d in self.params:
            out.update(d.targets or (d.name,))
        return out

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """Suggest every active dimension on `trial`; returns {dimension name: value}."""
        seen: dict[str, Any] = dict(self.fixed)
        sampled: dict[str, Any] = {}
        for d in self.params:
            if not _holds(d.when, seen):
                continue
            value = _suggest(trial, d)
            sampled[d.name] = seen[d.name] = value
        return sampled

    def overrides(self, sampled: dict[str, Any]) -> list[str]:
        """Hydra overrides for the fixed values and a sample (tied dimensions fan out)."""
        by_name = {d.name: d for d in self.params}
        values = dict(self.fixed)
        for name, value in sampled.items():
            for target in by_name[name].targets or (name,):
                values[target] = value
        return [f"{k}={format_value(v)}" for k, v in values.items()]

    def grid(self) -> dict[str, list]:
        if any(d.when for d in self.params):
            raise SpaceError(f"{self.path}: a grid search cannot use conditional (`when`) dimensions")
        return {d.name: d.grid_values() for d in self.params}

    def to_dict(self) -> dict:
        """The space as plain data (stored with a study, so every worker samples the same space)."""
        params = {}
        for d in self.params:
            spec: dict[str, Any] = {"type": d.type}
            if d.type == "categorical":
                spec["choices"] = list(d.choices)
            else:
                spec.update(low=d.low, high=d.high)
                if d.log:
                    spec["log"] = True
                if d.step is not None:
                    spec["step"] = d.step
            for key in ("when", "targets", "grid"):
                if getattr(d, key):
                    value = getattr(d, key)
                    spec[key] = dict(value) if key == "when" else list(value)
            params[d.name] = spec
        return {"fixed": dict(self.fixed), "params": params}


def format_value(value: Any) -> str:
    """One Hydra override value: booleans lower case, floats round-trip, odd strings quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    text = str(value)
    if text and all(c.isalnum() or c in "_-./" for c in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _holds(when: dict[str, Any], seen: dict[str, Any]) -> bool:
    for name, cond in when.items():
        if name not in seen:  # its own dimension was inactive: so is this one
            return False
        op, ref = next(iter(cond.items())) if isinstance(cond, dict) else ("eq", cond)
        if not _OPS[op](seen[name], ref):
            return False
    return True


def _suggest(trial: optuna.Trial, d: Dimension) -> Any:
    if d.type == "categorical":
        return trial.suggest_categorical(d.name, list(d.choices))
    if d.type == "int":
        return trial.suggest_int(d.name, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
    return trial.suggest_float(d.name, d.low, d.high, step=d.step, log=d.log)


# ---------------------------------------------------------------- loading and validation


def resolve_path(path: str | Path) -> Path:
    """A file path, or the name of a bundled space (`paper`, `demo`)."""
    p = Path(path)
    if p.is_file():
        return p
    bundled = SPACES_DIR / f"{path}.yaml"
    if bundled.is_file():
        return bundled
    known = sorted(f.stem for f in SPACES_DIR.glob("*.yaml"))
    raise SpaceError(f"{path}: no such space file (bundled spaces: {known})")


def load_space(path: str | Path) -> Space:
    p = resolve_path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SpaceError(f"{p}: not valid YAML: {err}") from None
    return parse_space(data, str(p))


def parse_space(data: Any, where: str = "<space>") -> Space:
    """Validate plain data (a parsed YAML file) into a `Space`; errors name `where` and the field."""
    if not isinstance(data, dict):
        raise SpaceError(f"{where}: the top level must be a mapping with `params` (and `fixed`)")
    unknown = set(data) - {"params", "fixed", "description"}
    if unknown:
        raise SpaceError(f"{where}: unknown top-level keys {sorted(unknown)}; "
                         "allowed: params, fixed, description")
    params, fixed = data.get("params") or {}, data.get("fixed") or {}
    if not isinstance(params, dict) or not params:
        raise SpaceError(f"{where}: `params` must be a non-empty mapping of dimensions")
    if not isinstance(fixed, dict):
        raise SpaceError(f"{where}: `fixed` must be a mapping of field: value")
    for name, value in fixed.items():
        _check_field(where, f"fixed.{name}", name, value)
    known = set(fixed)
    dims = []
    for name, spec in params.items():
        dim = _parse_dimension(where, str(name), spec, known)
        for target in dim.targets or (dim.name,):
            if target in fixed:
                raise SpaceError(f"{where}: params.{name}: {target} is also in `fixed`")
        known.add(dim.name)
        dims.append(dim)
    return Space(where, tuple(dims), dict(fixed))


def _parse_dimension(where: str, name: str, spec: Any, known: set[str]) -> Dimension:
    at = f"{where}: params.{name}"
    if not isinstance(spec, dict):
        raise SpaceError(f"{at}: must be a mapping with `type` ({', '.join(TYPES)})")
    unknown = set(spec) - _KEYS
    if unknown:
        raise SpaceError(f"{at}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise SpaceError(f"{at}.type: must be one of {list(TYPES)}, got {kind!r}")
    targets = tuple(spec.get("targets") or ())
    if targets:
        for t in targets:
            _check_field(where, f"params.{name}.targets", t, None)
    else:
        _check_field(where, f"params.{name}", name, None)
    when = spec.get("when") or {}
    _check_when(at, when, known)
    grid = tuple(spec.get("grid") or ())
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{at}.choices: a categorical dimension needs a non-empty list")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise SpaceError(f"{at}.choices: values must be numbers, strings or booleans, "
                                 f"got {c!r}")
            for t in targets or (name,):
                _check_field(where, f"params.{name}.choices", t, c)
        return Dimension(name, kind, choices=tuple(choices), when=dict(when), targets=targets)
    low, high = spec.get("low"), spec.get("high")
    for key, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SpaceError(f"{at}.{key}: a {kind} dimension needs a finite number, got {v!r}")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise SpaceError(f"{at}: an int dimension needs integer low/high, got {low}, {high}")
    if not low < high:
        raise SpaceError(f"{at}: empty range: low ({low}) must be < high ({high})")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise SpaceError(f"{at}: log scale needs low > 0, got low={low}")
    step = spec.get("step")
    if step is not None and (not isinstance(step, (int, float)) or step <= 0):
        raise SpaceError(f"{at}.step: must be a number > 0, got {step!r}")
    if step is not None and log:
        raise SpaceError(f"{at}: `step` and `log` cannot be combined")
    for t in targets or (name,):
        _check_field(where, f"params.{name}", t, int(low) if kind == "int" else float(low))
    return Dimension(name, kind, float(low), float(high), log, step, (), dict(when), targets, grid)


def _check_when(at: str, when: Any, known: set[str]) -> None:
    if not isinstance(when, dict):
        raise SpaceError(f"{at}.when: must be a mapping {{param: value or {{op: value}}}}")
    for ref, cond in when.items():
        if ref not in known:
            raise SpaceError(f"{at}.when: {ref!r} must be a dimension earlier in the file or a "
                             f"`fixed` field; known: {sorted(known)}")
        if isinstance(cond, dict) and (len(cond) != 1 or next(iter(cond)) not in _OPS):
            raise SpaceError(f"{at}.when.{ref}: one operator of {sorted(_OPS)}, got {cond}")


def config_fields() -> dict[str, type | str]:
    """Every dotted RunConfig field and its annotated type (as written in the dataclass)."""
    out: dict[str, Any] = {}
    defaults = RunConfig()
    for section in fields(RunConfig):
        node = getattr(defaults, section.name)
        if not is_dataclass(node):
            continue
        for f in fields(node):
            out[f"{section.name}.{f.name}"] = (f.type, f.default if f.default is not MISSING
                                               else getattr(node, f.name))
    return out


_SWEEP_OWNED = {"train.output_dir", "train.seed", "track.group", "track.run_name"}


def _check_field(where: str, at: str, name: str, value: Any) -> None:
    known = config_fields()
    if name not in known:
        section = name.split(".")[0]
        near = sorted(k for k in known if k.startswith(f"{section}."))
        hint = f"fields of {section}: {near}" if near else \
            f"sections: {sorted({k.split('.')[0] for k in known})}"
        raise SpaceError(f"{where}: {at}: unknown config field {name!r}; {hint}")
    if name in _SWEEP_OWNED:
        raise SpaceError(f"{where}: {at}: {name} is set by the sweep itself (use --seeds for seeds)")
    if value is None:
        return
    _, default = known[name]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:  # lists: Hydra checks them
        ok = True
    if not ok:
        raise SpaceError(f"{where}: {at}: {name} is a {type(default).__name__} field, "
                         f"got {value!r}")


def check_bounds(space: Space, preset: str, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Every fixed value and both ends of every dimension lie in the config fields' allowed
    ranges: the config is composed and validated (`experiments.config`, the one place that knows
    the ranges) with every dimension at its low end, at its high end, and with each categorical
    choice once. A sample that breaks a rule between two dimensions can still fail its trial."""
    from experiments.config import ConfigError, compose_config

    rounds = max([2] + [len(d.choices) for d in space.params if d.type == "categorical"])
    for k in range(rounds):
        sample = {d.name: _end(d, k) for d in space.params}
        try:
            compose_config(preset, [*overrides, *space.overrides(sample)])
        except ConfigError as err:
            raise SpaceError(_out_of_range(space, sample, str(err), preset)) from None


def _end(d: Dimension, k: int) -> Any:
    if d.type == "categorical":
        return d.choices[min(k, len(d.choices) - 1)]
    value = d.low if k % 2 == 0 else d.high
    return int(value) if d.type == "int" else value


def _out_of_range(space: Space, sample: dict[str, Any], message: str, preset: str) -> str:
    message = message.removeprefix("invalid config: ")
    for name, value in space.fixed.items():
        if message.startswith(f"{name} "):
            return f"{space.path}: fixed.{name} = {value!r} is outside the allowed range: {message}"
    for d in space.params:
        for target in d.targets or (d.name,):
            if message.startswith(f"{target} "):
                end = ("choice" if d.type == "categorical"
                       else "low" if sample[d.name] == d.low else "high")
                return (f"{space.path}: params.{d.name} ({end} {sample[d.name]!r}) is outside "
                        f"the allowed range: {message}")
    return f"{space.path}: with preset {preset} and the overrides, the config is invalid: {message}"
