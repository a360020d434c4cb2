import argparse

import pytest
import torch

from benchmarks.bench_train import _BLOCK, ProjectorOnly, added_interval, synthetic_steps
from ppc_core.models import build_model


def test_both_settings_get_the_same_number_of_timed_steps():
    args = argparse.Namespace(device="cpu", backbone="cnn4", classes=3, size=32, target=16,
                              batch=2, steps=2 * _BLOCK, warmup=1, bf16=False)
    times = synthetic_steps(args)
    assert set(times) == {"CAM only", "CAM + PPC"}
    assert [len(t) for t in times.values()] == [2 * _BLOCK, 2 * _BLOCK]
    assert all(s > 0 for t in times.values() for s in t)


def test_added_interval_resamples_paired_blocks():
    # Each block ran at its own speed (background load), the same for both settings inside it:
    # paired, the slowdown is exactly 10%; resampling the settings apart would widen it.
    speeds = [1 + (j * 7 % 11) / 10 for j in range(40)]
    base = [s for s in speeds for _ in range(_BLOCK)]
    lo, hi = added_interval(base, [1.1 * t for t in base], _BLOCK)
    assert abs(lo - 0.1) < 1e-9 and abs(hi - 0.1) < 1e-9
    # 10% slower in half the blocks only: the interval spans the two.
    other = [t * (1.1 if j % 2 else 1.0) for j, s in enumerate(speeds) for t in [s] * _BLOCK]
    lo, hi = added_interval(base, other, _BLOCK)
    assert 0.0 <= lo < hi <= 0.1 + 1e-9
    assert (lo, hi) == added_interval(base, other, _BLOCK)  # seeded


@pytest.mark.parametrize("align", [False, True])
def test_projector_only_steps_train_the_projector_but_add_no_ppc_term(align):
    torch.manual_seed(0)
    model = build_model("cnn4", 3)
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    terms = ProjectorOnly(16, False, align)(model, torch.randn(2, 3, 32, 32), labels)
    assert set(terms) == {"cls", "proj"} and terms["proj"].abs() < 1e-3
    sum(terms.values()).backward()
    assert model.projector.weight.grad.abs().sum() > 0
    assert model.cam_head.weight.grad.abs().sum() > 0
