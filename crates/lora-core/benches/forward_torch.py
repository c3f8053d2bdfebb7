#!/usr/bin/env python3
"""The reference for benches/forward.rs: the same shapes in PyTorch, as PEFT's unmerged
lora.Linear computes them (base(x) + lora_B(lora_A(dropout(x))) * scaling).

    /path/to/venv/bin/python crates/lora-core/benches/forward_torch.py [--threads 2]

Prints the median time of x Wᵀ and of the LoRA forward, and their ratio.
"""
import argparse
import statistics
import time

import torch

N, D, R = 512, 4096, 16


def median_time(fn, repeats=20):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, D, generator=g) * 2 - 1
    base = torch.nn.Linear(D, D, bias=False)
    lora_a = torch.nn.Linear(D, R, bias=False)
    lora_b = torch.nn.Linear(R, D, bias=False)
    scaling = 2.0
    with torch.no_grad():
        t_base = median_time(lambda: base(x))
        t_lora = median_time(lambda: base(x) + lora_b(lora_a(x)) * scaling)
    print(f"torch {torch.__version__}, {args.threads} threads")
    print(f"base_x_wt      {t_base * 1e3:8.2f} ms")
    print(f"lora_unmerged  {t_lora * 1e3:8.2f} ms")
    print(f"ratio          {t_lora / t_base:8.4f}")


if __name__ == "__main__":
    main()
