"""Cost of the run monitor's sampling thread on a CPU-bound loop (see benchmarks/README.md).

Prints the median time of a fixed workload with no sampler and with the sampler at 0.5 s and
0.05 s, and the cost of one ``sample_once`` call (cost / interval = share of a core).

    uv run python benchmarks/monitor_overhead.py [--seconds 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mgpr.monitor.nvml import open_nvml
from mgpr.monitor.sampler import DeviceSampler


def make_sampler(interval_s: float) -> DeviceSampler:
    """A sampler like a rank's: NVML + torch.cuda on a GPU machine, host RSS otherwise."""
    if torch.cuda.is_available():
        nvml, _ = open_nvml()
        gpu = None
        if nvml is not None:
            gpu = nvml.gpu(str(torch.cuda.get_device_properties(0).uuid))
        return DeviceSampler(gpu=gpu, nvml=nvml, torch_device_index=0, interval_s=interval_s)
    return DeviceSampler(gpu=None, nvml=None, torch_device_index=None, interval_s=interval_s)


def work(iterations: int) -> tuple[float, float]:
    """Run ``iterations`` 128x128 float32 matmuls.

    Returns:
        (wall seconds, CPU seconds of the OTHER threads of this process meanwhile, i.e. the
        sampler thread's own cost; immune to other users of a shared machine).
    """
    a = torch.randn(128, 128)
    b = torch.randn(128, 128)
    start, cpu0, mine0 = time.perf_counter(), time.process_time(), time.thread_time()
    for _ in range(iterations):
        a = torch.mm(a, b)
        a = a / (a.abs().max() + 1.0)
    wall = time.perf_counter() - start
    others = (time.process_time() - cpu0) - (time.thread_time() - mine0)
    return wall, max(0.0, others)


def main() -> None:
    """Print the timings and the overhead ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="work per timed run (s)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)

    per_iter = work(2000)[0] / 2000
    iterations = max(1000, int(args.seconds / per_iter))
    configs: list[float | None] = [None, 0.5, 0.05]
    times: dict[float | None, list[float]] = {c: [] for c in configs}
    other_cpu: dict[float | None, list[float]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for interval in configs:
            sampler = None if interval is None else make_sampler(interval)
            if sampler is not None:
                sampler.start()
            wall, others = work(iterations)
            times[interval].append(wall)
            other_cpu[interval].append(others / wall)
            if sampler is not None:
                sampler.stop()

    probe = make_sampler(0.5)
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        probe.sample_once()
    per_sample_s = (time.perf_counter() - start) / n

    kind = "NVML + torch.cuda + RSS" if probe.gpu is not None else "host RSS only"
    if probe.gpu is None and torch.cuda.is_available():
        kind = "torch.cuda + RSS (no NVML)"
    print(f"sampler reads: {kind}; work: {iterations} matmuls, {args.rounds} rounds, 1 thread")
    base, base_min = statistics.median(times[None]), min(times[None])
    print(f"no sampler      : wall median {base:.3f} s, min {base_min:.3f} s")
    for interval in configs[1:]:
        assert interval is not None
        med, low = statistics.median(times[interval]), min(times[interval])
        thread = statistics.median(other_cpu[interval]) - statistics.median(other_cpu[None])
        print(
            f"sampler {interval:>5.2f} s : wall median {med:.3f} s, min {low:.3f} s; "
            f"min-ratio {low / base_min:.4f} ({100 * (low / base_min - 1):+.2f}%); "
            f"sampler thread CPU {100 * thread:.3f}% of the run"
        )
    print(f"sample_once     : {1e6 * per_sample_s:.1f} us per sample")
    for interval in configs[1:]:
        assert interval is not None
        share = 100 * per_sample_s / interval
        print(f"  implied thread cost at {interval:.2f} s: {share:.4f}% of a core")


if __name__ == "__main__":
    main()
