"""Helpers shared by the side-by-side scripts of this folder (merge_peft.py, extract_torch.py,
train_torch.py): sizes, timing of whole processes in interleaved rounds, medians, reading
safetensors folders. Not a test; imported by the scripts, which run from the workspace root.
"""
import json
import os
import statistics
import subprocess
import sys
import time

SMALL = os.environ.get("LORA_BENCH_SMALL", "") not in ("", "0")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def bench_dir(name):
    """target/bench-data/NAME (NAME-small with LORA_BENCH_SMALL=1), from the workspace root."""
    path = os.path.join("target", "bench-data", name + ("-small" if SMALL else ""))
    os.makedirs(path, exist_ok=True)
    return path


def cached(path, params):
    """True when PATH/params.json holds PARAMS (the inputs were built with them before)."""
    try:
        with open(os.path.join(path, "params.json")) as f:
            return json.load(f) == params
    except (OSError, ValueError):
        return False


def mark_built(path, params):
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)


def timed(argv, sync=False, env=None):
    """Run argv to completion (then `sync` when asked); wall seconds and stdout. Fails loudly."""
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=None if env is None else {**os.environ, **env})
    if sync:
        subprocess.run(["sync"], check=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return elapsed, proc.stdout


def interleaved(sides, rounds, before=None):
    """Run every side once per round, rotating the order each round so that drifting load hits
    all alike. SIDES maps a name to a function returning a dict with at least "seconds"; BEFORE,
    if given, is called with the name before each run (outside the timing). Returns name ->
    list of dicts."""
    names = list(sides)
    out = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if before:
                before(name)
            result = sides[name]()
            out[name].append(result)
            log(f"round {r + 1}/{rounds} {name}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float)))
    return out


def median(runs, key="seconds"):
    return statistics.median(r[key] for r in runs)


def read_folder(path):
    """Every tensor of a safetensors model or adapter folder (or file), as numpy arrays."""
    from safetensors.numpy import load_file

    if os.path.isfile(path):
        return load_file(path)
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


def load_average():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
