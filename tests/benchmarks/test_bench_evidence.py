"""The evidence benchmark's statistics: paired intervals and the oracle ceiling of a grid."""

import math

import pytest
import torch

from benchmarks.bench_evidence import oracle_miou, paired_interval


def test_paired_interval_is_the_paired_t_interval():
    base = [0.30, 0.31, 0.29, 0.30, 0.32]
    ppc = [0.32, 0.32, 0.31, 0.33, 0.33]  # differences 0.02, 0.01, 0.02, 0.03, 0.01
    mean, lo, hi = paired_interval(base, ppc)
    assert mean == pytest.approx(0.018)
    sd = math.sqrt(sum((d - 0.018) ** 2 for d in (0.02, 0.01, 0.02, 0.03, 0.01)) / 4)
    half = 2.7764451 * sd / math.sqrt(5)  # t(0.975, 4 dof)
    assert (lo, hi) == pytest.approx((0.018 - half, 0.018 + half))
    # pairing matters: the same values shuffled across seeds give a wider interval
    _, lo2, hi2 = paired_interval(base, ppc[::-1])
    assert hi2 - lo2 > hi - lo
    assert paired_interval([0.1], [0.2])[1:] == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="equally many"):
        paired_interval([0.1], [0.2, 0.3])


def test_oracle_is_perfect_at_fine_grids_and_drops_on_coarser_ones():
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[0, 4:12, 8:16] = 1  # 8-pixel blocks, aligned to the cells of an 8x8 or 16x16 grid
    masks[1, 20:28, 0:8] = 2
    masks[1, 0, :] = 255  # ignored pixels are scored as nothing
    assert oracle_miou(masks, num_classes=2, grid=16) == pytest.approx(1.0)
    # bilinear upsampling rounds the blocks' corners off at 8x8; 4x4 cells hide them
    assert 0.9 < oracle_miou(masks, num_classes=2, grid=8) < 1.0
    assert oracle_miou(masks, num_classes=2, grid=4) < 0.5


def test_oracle_table_of_the_bundled_val_split(capsys):
    # the ceilings the README quotes: 4x4 / 8x8 / 16x16 grids on the 200 val canvases
    from benchmarks.bench_evidence import main

    main(["--oracle-only", "--preset", "digits_pretrained"])
    out = capsys.readouterr().out
    assert "| 4x4 | 0.277 |" in out
    assert "| 8x8 (preset digits_pretrained: target view 64 px) | 0.759 |" in out
    assert "| 16x16 | 0.967 |" in out


def test_step_cpu_ms_times_a_real_step(tmp_path):
    from benchmarks.bench_evidence import step_cpu_ms

    ms = step_cpu_ms("digits", [f"train.output_dir={tmp_path}"], steps=2, warmup=1)
    assert 0 < ms < 60_000
