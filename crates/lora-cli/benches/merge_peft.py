#!/usr/bin/env python3
"""`lora merge` side by side with PEFT and with copying the model folder (issue 5's target: at
least 3x faster than PEFT's load + merge_and_unload + save_pretrained, within 1.5x of a copy).

    cargo build --release -p lora-cli
    /work/venv/bin/python crates/lora-cli/benches/merge_peft.py [--lora target/release/lora] [--rounds 5]

Builds once, under target/bench-data/merge/ (seeded, reused while the parameters match): a 642 MiB
f32 Llama made by transformers (8 layers, hidden 1024, intermediate 2752, 16 heads, vocab 32768,
untied lm_head) and a rank-16 PEFT adapter (alpha 32, all seven projections of every layer,
lora_B filled with seeded noise so the merge changes every weight) saved by PEFT itself.
Then, in interleaved rounds (the order rotates each round), times as whole processes followed
by `sync`:
  lora    lora merge --base model --adapter adapter --out OUT
  peft    a fresh Python process: AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained
          + merge_and_unload + save_pretrained (its time after imports is printed too)
  copy    cp -r model OUT
and prints the medians and the ratios, then checks that the two merged models agree tensor by
tensor. LORA_BENCH_SMALL=1 uses a small model (2 layers, hidden 128) to test the script cheaply.
Output goes to docs/benchmarks.md through `cargo xtask bench --compare`.
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=32768)
SMALL = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=1024)


def build(root, params):
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    torch.manual_seed(params["seed"])
    cfg = LlamaConfig(**params["model"], max_position_embeddings=2048, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float()
    base = os.path.join(root, "model")
    model.save_pretrained(base)
    model.name_or_path = os.path.abspath(base)
    pmodel = get_peft_model(model, LoraConfig(r=params["rank"], lora_alpha=params["alpha"], target_modules=TARGETS,
                                              lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(params["seed"] + 1)
    with torch.no_grad():
        for _, mod in pmodel.named_modules():
            if isinstance(mod, LoraLayer):
                for an in mod.lora_B:
                    w = mod.lora_B[an].weight
                    w.copy_(torch.randn(w.shape, generator=g) * 0.01)
    pmodel.save_pretrained(os.path.join(root, "adapter"))
    benchutil.mark_built(root, params)


def peft_worker(base, adapter, out):
    """One PEFT merge, as a user's script does it; prints the seconds after imports."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter)
    model = model.merge_and_unload()
    model.save_pretrained(out)
    print(json.dumps({"after_imports": time.perf_counter() - start}))


def folder_mib(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20


def compare(ours, theirs, base):
    import numpy as np

    a, b, w = benchutil.read_folder(ours), benchutil.read_folder(theirs), benchutil.read_folder(base)
    if set(a) != set(b):
        raise SystemExit(f"the merged models hold different tensors: only lora {sorted(set(a) - set(b))[:5]}, "
                         f"only PEFT {sorted(set(b) - set(a))[:5]}")
    diff = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    largest = max(float(np.abs(b[k]).max()) for k in b)
    changed = sum(1 for k in a if not np.array_equal(a[k], w[k]))
    ok = diff <= 1e-5 * max(largest, 1.0)
    print(f"merged models {'agree' if ok else 'DISAGREE'}: {len(a)} tensors, {changed} changed by the merge, "
          f"max |lora - PEFT| {diff:.2e} (largest weight {largest:.3f})")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lora", default="target/release/lora")
    ap.add_argument("--rounds", type=int, default=2 if benchutil.SMALL else 5)
    ap.add_argument("--worker", nargs=3, metavar=("BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        peft_worker(*args.worker)
        return

    root = benchutil.bench_dir("merge")
    params = {"model": SMALL if benchutil.SMALL else FULL, "rank": 16, "alpha": 32, "seed": 0}
    if not benchutil.cached(root, params):
        log(f"building the model and the adapter in {root} (once)")
        build(root, params)
    base, adapter = os.path.join(root, "model"), os.path.join(root, "adapter")
    outs = {name: os.path.join(root, f"out-{name}") for name in ("lora", "peft", "copy")}

    def lora():
        seconds, _ = benchutil.timed([args.lora, "--quiet", "merge", "--base", base, "--adapter", adapter,
                                      "--out", outs["lora"]], sync=True)
        return {"seconds": seconds}

    def peft():
        seconds, out = benchutil.timed([sys.executable, os.path.abspath(__file__), "--worker", base, adapter,
                                        outs["peft"]], sync=True)
        return {"seconds": seconds, "after_imports": json.loads(out.strip().splitlines()[-1])["after_imports"]}

    def copy():
        seconds, _ = benchutil.timed(["cp", "-r", base, outs["copy"]], sync=True)
        return {"seconds": seconds}

    for path in (base, adapter):  # read the inputs once so that every side starts from the page cache
        for name in os.listdir(path):
            with open(os.path.join(path, name), "rb") as f:
                while f.read(1 << 24):
                    pass
    runs = benchutil.interleaved({"lora": lora, "peft": peft, "copy": copy}, args.rounds,
                                 before=lambda name: shutil.rmtree(outs[name], ignore_errors=True))
    m = params["model"]
    print(f"model: llama, {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, intermediate "
          f"{m['intermediate_size']}, vocab {m['vocab_size']}, f32, {folder_mib(base):.1f} MiB; adapter r "
          f"{params['rank']} on {len(TARGETS)} projections x {m['num_hidden_layers']} layers "
          f"({folder_mib(adapter):.1f} MiB)")
    print(f"{args.rounds} interleaved rounds, medians; each side a whole process followed by sync "
          f"(load average after: {benchutil.load_average()})")
    t_lora, t_peft, t_copy = (benchutil.median(runs[n]) for n in ("lora", "peft", "copy"))
    t_peft_inner = benchutil.median(runs["peft"], "after_imports")
    print(f"lora merge                                        {t_lora:7.3f} s")
    print(f"PEFT load + merge_and_unload + save_pretrained    {t_peft:7.3f} s  (after imports, no sync: "
          f"{t_peft_inner:.3f} s)")
    print(f"cp -r model folder                                {t_copy:7.3f} s")
    print(f"ratio PEFT / lora merge                 {t_peft / t_lora:5.2f}x  (target: at least 3)")
    print(f"ratio PEFT after imports / lora merge   {t_peft_inner / t_lora:5.2f}x")
    print(f"ratio lora merge / copy                 {t_lora / t_copy:5.2f}x  (target: at most 1.5)")
    ok = compare(outs["lora"], outs["peft"], base)
    sys.stdout.flush()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
