#!/usr/bin/env python3
"""`lora extract --rank 16` side by side with a Python script that does the same job with
torch.svd_lowrank (issue 5's target: faster than that script at no more error, with lora's whole
process counted).

    cargo build --release -p lora-cli
    /work/venv/bin/python crates/lora-cli/benches/extract_torch.py [--lora target/release/lora] [--rounds 3]

Builds once, under target/bench-data/extract/ (seeded, reused while the parameters match), a base
and a tuned model folder holding eight 4096 x 4096 f32 layers (model.layers.N.self_attn.q_proj;
512 MiB per folder). Each delta has the shape of a fine-tune's: G1 diag(1/i) G2^T over 1024
random directions plus Gaussian noise of standard deviation 3e-5 (as lora-svd's benches). The
exact spectrum of every delta (torch.linalg.svdvals) is stored beside, for the optimum error
sqrt(sum_{i>k} sigma_i^2) / ||dW||_F (Eckart-Young).

Then, in interleaved rounds, times as whole processes, files in and adapter out:
  lora    lora extract --base base --tuned tuned --out OUT --rank 16
  torch   a fresh Python process: load both safetensors files, per layer torch.svd_lowrank(dW,
          q = k + 10, niter = 2), B = U sqrt(S), A = sqrt(S) V^T, write a PEFT adapter folder
          (its time after imports is printed too)
and prints medians, ratios, and the relative Frobenius error ||dW - s B A||_F / ||dW||_F of both
written adapters (read back from their files, in f64) against the optimum.
LORA_BENCH_SMALL=1 uses 512 x 512 layers to test the script cheaply.
"""
import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402
from benchutil import log  # noqa: E402


def layer_names(n):
    return [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(n)]


def build(root, p):
    import numpy as np
    import torch
    from safetensors.torch import save_file

    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    g = torch.Generator().manual_seed(p["seed"])
    m = n = p["dim"]
    base, tuned, spectra = {}, {}, []
    for name in layer_names(p["layers"]):
        log(f"  {name}")
        r = min(1024, m, n)
        sigma = 1.0 / torch.arange(1, r + 1, dtype=torch.float32)
        u = torch.randn(m, r, generator=g) / m ** 0.5 * sigma
        v = torch.randn(n, r, generator=g) / n ** 0.5
        delta = u @ v.T + 3e-5 * torch.randn(m, n, generator=g)
        w = 0.02 * torch.randn(m, n, generator=g)
        base[name], tuned[name] = w, w + delta
        spectra.append(torch.linalg.svdvals(tuned[name] - base[name]).double().numpy())
    for folder, tensors in (("base", base), ("tuned", tuned)):
        os.makedirs(os.path.join(root, folder))
        save_file(tensors, os.path.join(root, folder, "model.safetensors"))
        with open(os.path.join(root, folder, "config.json"), "w") as f:
            json.dump({"model_type": "llama"}, f)
    np.save(os.path.join(root, "spectra.npy"), np.stack(spectra))
    benchutil.mark_built(root, p)


def torch_worker(base, tuned, out, rank):
    """The Python script being compared: what a user writes with torch.svd_lowrank."""
    import torch
    from safetensors.torch import load_file, save_file

    start = time.perf_counter()
    torch.manual_seed(0)
    b = load_file(os.path.join(base, "model.safetensors"))
    t = load_file(os.path.join(tuned, "model.safetensors"))
    factors, modules = {}, []
    for name in sorted(t):
        if t[name].dim() != 2 or not name.endswith(".weight"):
            continue
        delta = t[name] - b[name]
        u, s, v = torch.svd_lowrank(delta, q=rank + 10, niter=2)
        root = s[:rank].sqrt()
        module = name[: -len(".weight")]
        factors[f"base_model.model.{module}.lora_A.weight"] = (v[:, :rank] * root).T.contiguous()
        factors[f"base_model.model.{module}.lora_B.weight"] = (u[:, :rank] * root).contiguous()
        modules.append(module.rsplit(".", 1)[-1])
    os.makedirs(out)
    save_file(factors, os.path.join(out, "adapter_model.safetensors"))
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted(set(modules)),
                   "task_type": "CAUSAL_LM", "bias": "none", "base_model_name_or_path": base}, f, indent=2)
    print(json.dumps({"after_imports": time.perf_counter() - start}))


def errors(adapter, base, tuned, spectra, names, rank):
    """(error / optimum) per layer of the adapter folder ADAPTER, in f64."""
    import numpy as np

    with open(os.path.join(adapter, "adapter_config.json")) as f:
        cfg = json.load(f)
    f = benchutil.read_folder(adapter)
    b, t = benchutil.read_folder(base), benchutil.read_folder(tuned)
    out = []
    for i, name in enumerate(names):
        module = name[: -len(".weight")]
        a_ = f[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
        b_ = f[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
        r = a_.shape[0]
        if r != rank:
            raise SystemExit(f"{adapter}: {module} has rank {r}, not {rank}")
        scale = cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
        delta = (t[name] - b[name]).astype(np.float64)
        norm = np.linalg.norm(delta)
        err = np.linalg.norm(delta - scale * (b_ @ a_)) / norm
        optimum = np.sqrt(np.sum(spectra[i][rank:] ** 2)) / norm
        out.append(err / optimum)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lora", default="target/release/lora")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2 if benchutil.SMALL else 3)
    ap.add_argument("--worker", nargs=4, metavar=("BASE", "TUNED", "OUT", "RANK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        torch_worker(*args.worker[:3], int(args.worker[3]))
        return

    import numpy as np

    root = benchutil.bench_dir("extract")
    params = {"layers": 8, "dim": 512 if benchutil.SMALL else 4096, "seed": 0}
    if not benchutil.cached(root, params):
        log(f"building the base and tuned folders in {root}, with exact spectra (once)")
        build(root, params)
    base, tuned = os.path.join(root, "base"), os.path.join(root, "tuned")
    spectra = np.load(os.path.join(root, "spectra.npy"))
    outs = {name: os.path.join(root, f"out-{name}") for name in ("lora", "torch")}

    def lora():
        seconds, _ = benchutil.timed([args.lora, "--quiet", "extract", "--base", base, "--tuned", tuned,
                                      "--out", outs["lora"], "--rank", str(args.rank)])
        return {"seconds": seconds}

    def torch_script():
        seconds, out = benchutil.timed([sys.executable, os.path.abspath(__file__), "--worker", base, tuned,
                                        outs["torch"], str(args.rank)])
        return {"seconds": seconds, "after_imports": json.loads(out.strip().splitlines()[-1])["after_imports"]}

    for folder in (base, tuned):
        with open(os.path.join(folder, "model.safetensors"), "rb") as f:
            while f.read(1 << 24):
                pass
    runs = benchutil.interleaved({"lora": lora, "torch": torch_script}, args.rounds,
                                 before=lambda name: shutil.rmtree(outs[name], ignore_errors=True))
    names = layer_names(params["layers"])
    d = params["dim"]
    print(f"{len(names)} layer pairs of {d} x {d} f32 ({2 * len(names) * d * d * 4 / 2**20:.0f} MiB of inputs), "
          f"rank {args.rank}; {args.rounds} interleaved rounds, medians (load average after: "
          f"{benchutil.load_average()})")
    t_lora, t_torch = benchutil.median(runs["lora"]), benchutil.median(runs["torch"])
    t_inner = benchutil.median(runs["torch"], "after_imports")
    print(f"lora extract --rank {args.rank} (whole process)               {t_lora:7.3f} s")
    print(f"python + torch.svd_lowrank (whole process)        {t_torch:7.3f} s")
    print(f"python + torch.svd_lowrank (after imports)        {t_inner:7.3f} s")
    print(f"ratio torch whole process / lora               {t_torch / t_lora:5.2f}x")
    print(f"ratio torch after imports / lora whole process {t_inner / t_lora:5.2f}x  (target: above 1)")
    for name in ("lora", "torch"):
        e = errors(outs[name], base, tuned, spectra, names, args.rank)
        print(f"{name:5} error / optimum: mean {np.mean(e):.5f}, worst {np.max(e):.5f}")


if __name__ == "__main__":
    main()
