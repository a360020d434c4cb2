"""`python -m benchmarks` (`make bench`): every benchmark table, quick settings (~6 minutes).

The evidence benchmark (PPC vs baseline over seeds, ~15 minutes) runs on its own:
`python -m benchmarks.bench_evidence`.
"""

from benchmarks import bench_ppc_loss, bench_sweep, bench_train

if __name__ == "__main__":
    print("## PPC loss: vectorised vs reference loops\n")
    bench_ppc_loss.main([])
    print("\n## Training throughput, PPC on and off\n")
    bench_train.main([])
    print()
    bench_train.main(["--preset"])
    print("\n## Sweep orchestration\n")
    bench_sweep.main(["--budget", "60"])
