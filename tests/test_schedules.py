import pytest

from ppc_core.schedules import poly_lr, ppc_ramp


def test_poly_lr_matches_reference_formula():
    assert poly_lr(0, 100, 0.01) == pytest.approx(0.01)
    assert poly_lr(50, 100, 0.01, 0.9) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(100, 100, 0.01) == 0.0
    assert poly_lr(150, 100, 0.01) == 0.0


def test_ppc_ramp_starts_late_and_ramps_linearly():
    assert [ppc_ramp(s, 10, 4) for s in (0, 9, 10, 11, 13, 50)] == [0, 0, 0.25, 0.5, 1.0, 1.0]
    assert ppc_ramp(0, 0, 0) == 1.0
