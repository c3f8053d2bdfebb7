"""lora-svd's randomized extraction side by side with torch.svd_lowrank and torch.linalg.svd, on
the same matrices and the same machine, interleaved so that both see the same load.

Not a test: torch is only needed here. Usage, from the workspace root:

    /work/venv/bin/python crates/lora-svd/benches/compare_torch.py

It builds and runs `cargo run --release -p lora-svd --example svd_report` (dump, then timing
rounds), runs torch.svd_lowrank(q = k + 10, niter = 2) (torch's recommended oversampling, as in
the issue's 0.117 s figure) on 2 threads, and prints a markdown table: median times of all
rounds and errors relative to the optimum sqrt(sum_{i>k} sigma_i^2) / ||A||_F. The exact
torch.linalg.svd (full_matrices=False) is timed once per shape (it takes 10-40 s at 4096 x 4096
here, and does not depend on the rank); its singular values give the optimum, and its own error
at rank k (U_k S_k V_k^T in f32) is printed too.

LORA_BENCH_SMALL=1 uses 512 x 512 and 512 x 1376 matrices to test the script cheaply.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

SMALL = os.environ.get("LORA_BENCH_SMALL", "") not in ("", "0")
DIR = "target/bench-data/svd" + ("-small" if SMALL else "")
SHAPES = [(512, 512), (512, 1376)] if SMALL else [(4096, 4096), (4096, 11008)]
RANKS = [16, 64]
ROUNDS = 3
REPS = 3


def example(*args):
    cmd = ["cargo", "run", "--quiet", "--release", "-p", "lora-svd", "--example", "svd_report", "--", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main():
    torch.set_num_threads(2)
    example("dump", DIR, *(f"{m}x{n}" for m, n in SHAPES))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()}",
          file=sys.stderr)
    print("| shape | rank | lora-svd median (s) | lora-svd error / optimum | torch.svd_lowrank median (s) "
          "| svd_lowrank error / optimum | torch.linalg.svd (s) | linalg.svd error / optimum "
          "| svd_lowrank time / lora-svd time | linalg.svd time / lora-svd time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, n in SHAPES:
        path = f"{DIR}/decaying_{m}x{n}.f32"
        a = torch.from_numpy(np.fromfile(path, dtype="<f4").reshape(m, n))
        norm = torch.linalg.matrix_norm(a.double()).item()
        start = time.perf_counter()
        u_x, s_x, vh_x = torch.linalg.svd(a, full_matrices=False)
        t_exact = time.perf_counter() - start
        sigma = s_x.double()
        for k in RANKS:
            optimum = torch.sqrt(torch.sum(sigma[k:] ** 2)).item() / norm
            ours, theirs = [], []
            our_err = torch_err = None
            for _ in range(ROUNDS):
                out = json.loads(example("time", path, str(m), str(n), str(k), str(REPS)))
                ours += out["times"]
                our_err = out["rel_error"]
                torch.svd_lowrank(a, q=k + 10, niter=2)  # warm-up
                for _ in range(REPS):
                    start = time.perf_counter()
                    u, s, v = torch.svd_lowrank(a, q=k + 10, niter=2)
                    theirs.append(time.perf_counter() - start)
                approx = (u[:, :k] * s[:k]) @ v[:, :k].T
                torch_err = torch.linalg.matrix_norm((a - approx).double()).item() / norm
            exact_err = torch.linalg.matrix_norm((a - (u_x[:, :k] * s_x[:k]) @ vh_x[:k]).double()).item() / norm
            t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
            print(f"| {m} x {n} | {k} | {t_ours:.3f} | {our_err / optimum:.5f} | {t_theirs:.3f} "
                  f"| {torch_err / optimum:.5f} | {t_exact:.2f} | {exact_err / optimum:.5f} "
                  f"| {t_theirs / t_ours:.2f} | {t_exact / t_ours:.0f} |", flush=True)
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    main()
