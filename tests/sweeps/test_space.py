from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from experiments.config import compose_config
from sweeps.space import SpaceError, format_value, load_space, parse_space


def _bad(tmp_path: Path, params: dict, fixed: dict | None = None) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"params": params, **({"fixed": fixed} if fixed else {})}))
    with pytest.raises(SpaceError) as err:
        load_space(path)
    assert str(path) in str(err.value)
    return str(err.value)


def test_bundled_spaces_load() -> None:
    paper = load_space("paper")
    assert {"ppc.tau", "ppc.top_k_ratio", "ppc.w_cross_proto", "ppc.w_cross_cam", "ppc.w_intra",
            "ppc.bg_threshold", "ppc.neg_drop", "ppc.neg_keep_ratio", "ppc.hard_random_ratio",
            "ppc.hard_rank_lo", "ppc.hard_rank_hi", "loss.ppc_start_step",
            "loss.ppc_ramp_steps", "optim.lr"} <= set(paper.names)
    demo = load_space("demo")
    assert "ppc.w_intra" in demo.fields() and "ppc_weight" in demo.names


def test_unknown_field_names_the_section_fields(tmp_path: Path) -> None:
    msg = _bad(tmp_path, {"ppc.tauu": {"type": "float", "low": 0.1, "high": 0.2}})
    assert "ppc.tauu" in msg and "ppc.tau" in msg  # the allowed fields are listed


def test_unknown_section(tmp_path: Path) -> None:
    msg = _bad(tmp_path, {"ppcx.tau": {"type": "float", "low": 0.1, "high": 0.2}})
    assert "sections" in msg and "optim" in msg


@pytest.mark.parametrize("spec, words", [
    ({"type": "float", "low": 0.5, "high": 0.5}, "empty range"),
    ({"type": "float", "low": 0.9, "high": 0.1}, "empty range"),
    ({"type": "normal", "low": 0.1, "high": 0.2}, "must be one of"),
    ({"type": "float", "low": 0.0, "high": 0.2, "log": True}, "log scale needs low > 0"),
    ({"type": "categorical", "choices": []}, "non-empty list"),
    ({"type": "categorical"}, "non-empty list"),
    ({"type": "float", "low": "a", "high": 0.2}, "finite number"),
    ({"type": "float", "low": 0.1, "high": 0.2, "sigma": 1}, "unknown keys"),
    ({"type": "float", "low": 0.1, "high": 0.2, "when": {"optim.lr": 1}}, "earlier in the file"),
])
def test_bad_dimensions(tmp_path: Path, spec: dict, words: str) -> None:
    assert words in _bad(tmp_path, {"ppc.tau": spec})


def test_type_mismatch_and_sweep_owned_fields(tmp_path: Path) -> None:
    assert "int field" in _bad(tmp_path, {"ppc.neg_drop": {"type": "float", "low": 0.5,
                                                           "high": 2.5}})
    assert "set by the sweep" in _bad(tmp_path, {"train.seed": {"type": "int", "low": 0,
                                                                "high": 3}})
    assert "bool field" in _bad(tmp_path, {"ppc.tau": {"type": "float", "low": 0.1, "high": 1}},
                                fixed={"loss.use_ppc": 3})


def test_missing_file_lists_bundled() -> None:
    with pytest.raises(SpaceError, match="bundled spaces"):
        load_space("no_such_space")


def test_conditional_dimensions_follow_their_condition() -> None:
    space = load_space("paper")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_on = seen_off = 0
    for _ in range(40):
        trial = study.ask()
        sampled = space.sample(trial)
        mining = {"ppc.neg_drop", "ppc.hard_rank_lo", "ppc.hard_rank_hi"}
        if sampled["ppc.w_intra"] > 0:
            assert mining <= set(sampled)
            assert sampled["ppc.hard_rank_lo"] < sampled["ppc.hard_rank_hi"]
            seen_on += 1
        else:
            assert not mining & set(sampled)
            seen_off += 1
        study.tell(trial, 0.0)
    assert seen_on and seen_off


def test_tied_dimension_fans_out_and_composes() -> None:
    space = load_space("demo")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    sampled = space.sample(study.ask())
    overrides = space.overrides(sampled)
    cfg = compose_config("digits", overrides)
    w = sampled["ppc_weight"]
    assert cfg.ppc.w_cross_proto == cfg.ppc.w_cross_cam == cfg.ppc.w_intra == pytest.approx(w)
    assert cfg.ppc.tau == pytest.approx(sampled["ppc.tau"])
    assert cfg.loss.ppc_ramp_steps == space.fixed["loss.ppc_ramp_steps"]


def test_grid_values_and_round_trip() -> None:
    space = parse_space({"params": {
        "ppc.neg_drop": {"type": "int", "low": 0, "high": 6, "step": 2},
        "ppc.tau": {"type": "float", "low": 0.05, "high": 0.2, "grid": [0.05, 0.1, 0.2]},
        "loss.use_ppc": {"type": "categorical", "choices": [True, False]}}})
    assert space.grid() == {"ppc.neg_drop": [0, 2, 4, 6], "ppc.tau": [0.05, 0.1, 0.2],
                            "loss.use_ppc": [True, False]}
    assert parse_space(space.to_dict()).to_dict() == space.to_dict()
    with pytest.raises(SpaceError, match="conditional"):
        load_space("paper").grid()


def test_format_value_quotes_what_hydra_would_misread() -> None:
    assert format_value(True) == "true"
    assert format_value(0.1) == "0.1"
    assert format_value("runs/a_b-1") == "runs/a_b-1"
    assert format_value("sqlite:////x/y.db") == "'sqlite:////x/y.db'"
