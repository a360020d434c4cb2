"""The background-threshold sweep: its range and the flag for a best threshold at its edge."""

import warnings

import pytest
import torch

from ppc_core.evaluate import DEFAULT_THRESHOLDS, best_threshold_index, evaluate
from tests.test_evaluate import BG_SCORE, NUM_CLASSES, _loader, _TruthCAM


def test_default_sweep_covers_the_whole_range():
    assert DEFAULT_THRESHOLDS[0] == 0.0 and DEFAULT_THRESHOLDS[-1] == 1.0
    assert len(DEFAULT_THRESHOLDS) == 101


def test_best_threshold_index_flags_both_edges_only():
    t = torch.tensor([0.1, 0.2, 0.3])
    assert best_threshold_index(t, torch.tensor([0.5, 0.4, 0.3])) == (0, True)
    assert best_threshold_index(t, torch.tensor([0.3, 0.4, 0.5])) == (2, True)
    assert best_threshold_index(t, torch.tensor([0.3, 0.5, 0.4])) == (1, False)
    # NaN never wins; ties go to the first; a one-threshold sweep has no edge to speak of
    assert best_threshold_index(t, torch.tensor([float("nan"), 0.4, 0.4])) == (1, False)
    assert best_threshold_index(torch.tensor([0.2]), torch.tensor([0.7])) == (0, False)


def test_a_sweep_that_stops_below_the_best_threshold_says_so():
    # The toy CAM's background pixels score BG_SCORE: every threshold below it loses them alike,
    # so a sweep that stops short of it scores the same everywhere and its best is at an edge.
    short = torch.tensor([0.0, 0.1, BG_SCORE - 0.05])
    with pytest.warns(UserWarning, match="edge of the sweep"):
        capped = evaluate(_TruthCAM(), _loader(), NUM_CLASSES, thresholds=short, progress=False)
    assert capped.best_threshold_at_edge
    assert capped.best_threshold == pytest.approx(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = evaluate(_TruthCAM(), _loader(), NUM_CLASSES, progress=False)
    assert not full.best_threshold_at_edge
    assert full.cam_miou > capped.cam_miou
