import argparse

from benchmarks.bench_train import _BLOCK, synthetic_steps


def test_both_settings_get_the_same_number_of_timed_steps():
    args = argparse.Namespace(device="cpu", backbone="cnn4", classes=3, size=32, target=16,
                              batch=2, steps=2 * _BLOCK, warmup=1, bf16=False)
    times = synthetic_steps(args)
    assert set(times) == {"CAM only", "CAM + PPC"}
    assert [len(t) for t in times.values()] == [2 * _BLOCK, 2 * _BLOCK]
    assert all(s > 0 for t in times.values() for s in t)
