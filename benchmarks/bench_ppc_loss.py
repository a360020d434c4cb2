"""Forward+backward time, peak memory and agreement: `PPCLoss` against the loop-style baseline.

Run from the repository root: `python -m benchmarks.bench_ppc_loss` (see benchmarks/README.md).
Prints a markdown table: the baseline (`benchmarks/ppc_reference.py`, the reference's loops),
then `PPCLoss` with `ppc.impl=reference` (the readable terms under autograd) and with
`ppc.impl=fused` (the engine training uses). Timing runs use each implementation's own sampling
(the baseline with the reference's `random.sample` calls and its unused random negatives); the
agreement columns feed all the same random keys so that they pick identical pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.ppc_reference import method_fields, reference_ppc_loss
from ppc_core.losses.ppc import PPCConfig, PPCLoss
from ppc_core.objective import PPCWeights

LossFn = Callable[[dict[str, Tensor]], dict[str, Tensor]]
TERMS = ("cross_proto", "cross_cam", "intra")


def make_inputs(batch: int, grid: int, num_classes: int, dim: int, seed: int) -> dict[str, Tensor]:
    """Two aligned views with 1-3 foreground classes per image.

    Returns feats_s/feats_t (batch, dim, grid, grid) leaves requiring grad (ReLU'd like the
    projector), cam_s/cam_t (batch, num_classes+1, grid, grid) and labels (batch, num_classes).
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(batch, num_classes)
    for b in range(batch):
        present = torch.randperm(num_classes, generator=g)[: int(torch.randint(1, 4, (1,), generator=g))]
        labels[b, present] = 1.0
    cam_s = torch.randn(batch, num_classes + 1, grid, grid, generator=g)
    # The target view sees the same image: correlated CAMs and features.
    cam_t = cam_s + 0.5 * torch.randn(cam_s.shape, generator=g)
    base = torch.randn(batch, dim, grid, grid, generator=g)
    feats_s = base.relu().requires_grad_()
    feats_t = (base + 0.5 * torch.randn(base.shape, generator=g)).relu().requires_grad_()
    return {"feats_s": feats_s, "cam_s": cam_s, "feats_t": feats_t, "cam_t": cam_t,
            "labels": labels}


def _args(x: dict[str, Tensor]) -> tuple[Tensor, ...]:
    return x["feats_s"], x["cam_s"], x["feats_t"], x["cam_t"], x["labels"]


def ours(cfg: PPCConfig, seed: int | None = None, impl: str | None = None) -> LossFn:
    """`PPCLoss` as a function of the inputs; a seed fixes its sampling generator; impl
    overrides cfg.impl."""
    loss = PPCLoss(cfg if impl is None else dataclasses.replace(cfg, impl=impl))

    def run(x: dict[str, Tensor]) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        return loss(*_args(x), generator=g)

    return run


def reference(cfg: PPCConfig, seed: int | None = None, draw_unused_negatives: bool = True) -> LossFn:
    """The baseline; a seed draws its random keys exactly as `PPCLoss` draws its noise.

    Without a seed it samples with `random.sample`, as the reference does.
    """
    kwargs = method_fields(cfg)

    def run(x: dict[str, Tensor]) -> dict[str, Tensor]:
        keys = None
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            n = x["feats_s"][:, 0].numel()
            # PPCLoss draws torch.rand(N) for the source view's intra term, then the target's.
            keys = (torch.rand(n, generator=g), torch.rand(n, generator=g))
        return reference_ppc_loss(*_args(x), **kwargs, random_keys=keys,
                                  draw_unused_negatives=draw_unused_negatives)

    return run


def forward_backward(fn: LossFn, x: dict[str, Tensor],
                     weights: PPCWeights | None = None) -> dict[str, Tensor]:
    """One training-step worth of loss work: the terms, and gradients into the features of
    their total under `weights` (the reference's by default), as the objective weighs them."""
    for name in ("feats_s", "feats_t"):
        x[name].grad = None
    out = fn(x)
    w = dataclasses.asdict(weights or PPCWeights())
    sum(w[name] * out[name] for name in TERMS).backward()
    return out


def interleaved_ms(
    fns: Sequence[LossFn], x: dict[str, Tensor], repeats: Sequence[int], warmup: int = 1
) -> list[tuple[float, float]]:
    """(median, best) forward+backward wall time in milliseconds of each function.

    The functions take turns, round by round, so that load from other processes on a small
    shared machine falls on all of them alike; the best run is reported too because such load
    only ever adds time. fns[i] runs repeats[i] times in all (spread over max(repeats) rounds).
    """
    for fn in fns:
        for _ in range(warmup):
            forward_backward(fn, x)
    rounds = max(repeats)
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for fn, count, out in zip(fns, repeats, times, strict=True):
            # Spread fn's runs evenly: run it in round r when its quota grows past the done count.
            while len(out) < (r + 1) * count // rounds:
                start = time.perf_counter()
                forward_backward(fn, x)
                out.append((time.perf_counter() - start) * 1e3)
    return [(statistics.median(t), min(t)) for t in times]


class AllocationRecorder(TorchDispatchMode):
    """Records the storage size of every op output (forward and backward alike).

    Views (expand, permute, ...) share their input's storage, so a big storage means a real
    allocation of that size, not a broadcast.
    """

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[tuple[str, tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                nbytes = t.untyped_storage().nbytes()
                self.allocations.append((str(func), tuple(t.shape), nbytes))
        return out

    def at_least(self, nbytes: int) -> list[tuple[str, tuple[int, ...], int]]:
        """The recorded outputs whose storage holds at least `nbytes` bytes."""
        return [a for a in self.allocations if a[2] >= nbytes]


def per_pixel_prototype_bytes(x: dict[str, Tensor]) -> int:
    """Bytes of an (N, C+1, D) float32 tensor for these inputs."""
    b, d, h, w = x["feats_s"].shape
    return b * h * w * x["cam_s"].shape[1] * d * 4


def records_per_pixel_prototypes(fn: LossFn, x: dict[str, Tensor]) -> bool:
    """Whether forward+backward allocates anything as large as an (N, C+1, D) float32 tensor."""
    with AllocationRecorder() as rec:
        forward_backward(fn, x)
    return bool(rec.at_least(per_pixel_prototype_bytes(x)))


def peak_extra_bytes(fn: LossFn, x: dict[str, Tensor]) -> tuple[int, int]:
    """(peak bytes allocated above the starting level, largest single allocation) of one
    forward+backward, from the CPU allocator events the profiler records."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        forward_backward(fn, x)
    events: list[tuple[int, int, int]] = []

    def walk(e) -> None:  # noqa: ANN001
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            events.append((e.start_time_ns, f.alloc_size, f.total_allocated))
        for child in e.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not events:
        return 0, 0
    events.sort()
    start = events[0][2] - events[0][1]
    return max(e[2] for e in events) - start, max(e[1] for e in events)


def max_differences(a: LossFn, b: LossFn, x: dict[str, Tensor]) -> tuple[float, float]:
    """Largest |difference| over the loss terms, and over the feature gradients."""
    out_a = forward_backward(a, x)
    grads_a = [x[n].grad.clone() for n in ("feats_s", "feats_t")]
    out_b = forward_backward(b, x)
    grads_b = [x[n].grad.clone() for n in ("feats_s", "feats_t")]
    term = max(float((out_a[t] - out_b[t]).detach().abs().max()) for t in TERMS)
    grad = max(float((ga - gb).abs().max()) for ga, gb in zip(grads_a, grads_b, strict=True))
    return term, grad


def bench_grid(grid: int, args: argparse.Namespace) -> list[dict[str, object]]:
    """The baseline and both `PPCLoss` implementations at one feature grid; one row each."""
    cfg = PPCConfig()
    x = make_inputs(args.batch, grid, args.classes, args.dim, args.seed)
    big = grid > 16
    impls = (("reference loops (baseline)", reference(cfg),
              args.ref_repeats if big else args.repeats),
             ("ppc.impl=reference (readable)", ours(cfg, impl="reference"),
              args.readable_repeats if big else args.repeats),
             ("ppc.impl=fused", ours(cfg, impl="fused"), args.repeats))
    timings = interleaved_ms([fn for _, fn, _ in impls], x, [n for _, _, n in impls])
    rows = []
    for (name, fn, repeats), (median, best) in zip(impls, timings, strict=True):
        peak, largest = peak_extra_bytes(fn, x)
        rows.append({
            "grid": f"{grid}x{grid}", "impl": name, "ms": median, "best_ms": best,
            "repeats": repeats, "peak_mb": peak / 2**20, "largest_mb": largest / 2**20,
            "npd": records_per_pixel_prototypes(fn, x),
        })
    for row, impl in zip(rows[1:], ("reference", "fused"), strict=True):
        row["speedup"] = rows[0]["ms"] / row["ms"]
        row["best_speedup"] = rows[0]["best_ms"] / row["best_ms"]
        row["term_diff"], row["grad_diff"] = max_differences(
            ours(cfg, args.seed, impl), reference(cfg, args.seed), x)
    return rows


def format_table(rows: Sequence[dict[str, object]], n_of: Callable[[str], int]) -> str:
    """Markdown table of `bench_grid` rows."""
    lines = [
        "| grid | N | impl | fwd+bwd ms median (best; repeats) | speed-up median (best) "
        "| peak extra MB "
        "| largest alloc MB | (N,C+1,D) allocated? | max abs loss diff | max abs grad diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = (f"{r['speedup']:.1f}x ({r['best_speedup']:.1f}x)" if "speedup" in r
                 else "1.0x")
        diff = f"{r['term_diff']:.1e}" if "term_diff" in r else "(baseline)"
        gdiff = f"{r['grad_diff']:.1e}" if "grad_diff" in r else "(baseline)"
        lines.append(
            f"| {r['grid']} | {n_of(str(r['grid']))} | {r['impl']} "
            f"| {r['ms']:.1f} ({r['best_ms']:.1f}; {r['repeats']}) "
            f"| {speed} | {r['peak_mb']:.1f} | {r['largest_mb']:.1f} "
            f"| {'yes' if r['npd'] else 'no'} | {diff} | {gdiff} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[16, 56])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=20, help="foreground classes C")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--ref-repeats", type=int, default=3,
                        help="baseline repeats on grids above 16x16 (it takes seconds each)")
    parser.add_argument("--readable-repeats", type=int, default=5,
                        help="ppc.impl=reference repeats on grids above 16x16")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.grids) < 2 or args.batch < 1 or args.classes < 1 or args.dim < 1:
        raise ValueError("bench_ppc_loss: --grids must be >= 2, --batch/--classes/--dim >= 1")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = [row for grid in args.grids for row in bench_grid(grid, args)]
    print(f"batch {args.batch}, D {args.dim}, C+1 = {args.classes + 1} classes, "
          f"{args.threads} torch threads, torch {torch.__version__}\n")
    print(format_table(rows, lambda g: args.batch * int(g.split("x")[0]) ** 2))
    print(f"\n(benchmark took {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
