#!/usr/bin/env python3
"""`lora train` tokens per second side by side with a PyTorch + PEFT training loop on the same
model, data, batch, sequence length and threads (issue 7's target: at least PyTorch's).

    cargo build --release -p lora-cli
    /work/venv/bin/python crates/lora-cli/benches/train_torch.py [--lora target/release/lora] \\
        [--case tiny|bench] [--threads 2] [--steps 20] [--rounds 2] [--attn sdpa|eager]

Builds once, under target/bench-data/train/ (seeded): a Llama folder made by transformers with the
shapes of lora-train's train_step bench (tiny: hidden 128, intermediate 344, 2 layers, 4 heads,
2 kv heads, vocab 8192, batch 8 x 64 tokens; bench: hidden 512, intermediate 1376, 8 layers, 8
heads, 4 kv heads, batch 8 x 256) and data.txt, seeded random words (no tokenizer.json: both
sides read raw bytes as token ids and cut them into blocks of the sequence length).
Both sides: LoRA r 16, alpha 32 on all seven projections, dropout 0, AdamW at a constant rate
1e-4, weight decay 0, gradient clipping at norm 1, no gradient accumulation, f32, the adapter
written at the end:
  lora    lora train --base model --data data.txt --out OUT ... --threads T
  torch   a fresh Python process: from_pretrained, get_peft_model, the same loop
          (forward, backward, clip_grad_norm_, AdamW step), torch.set_num_threads(T), save_pretrained
Interleaved rounds; prints the median step's tokens/s of each side (lora's from its
metrics.jsonl, the first step left out of both) and the whole process's, and the ratios.
PyTorch uses transformers' default attention (sdpa) unless --attn eager.
LORA_BENCH_SMALL=1 runs 4 steps of the tiny case, one round, to test the script cheaply.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402
from benchutil import log  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "tiny": dict(model=dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=8192), batch=8, seq=64),
    "bench": dict(model=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=8192), batch=8, seq=256),
}
RANK, ALPHA, LR, CLIP = 16, 32, 1e-4, 1.0


def build(root, p):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    torch.manual_seed(p["seed"])
    LlamaForCausalLM(LlamaConfig(**p["model"], max_position_embeddings=1024, tie_word_embeddings=False)) \
        .float().save_pretrained(os.path.join(root, "model"))
    rng = random.Random(p["seed"])
    words = ["low", "rank", "adapter", "weight", "frozen", "matrix", "train", "token", "layer", "the", "a", "of",
             "model", "small", "update", "gradient", "step", "loss", "falls", "and", "with", "cpu"]
    text, size = [], 0
    while size < p["data_bytes"]:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) + ".\n"
        text.append(line)
        size += len(line)
    with open(os.path.join(root, "data.txt"), "w") as f:
        f.write("".join(text))
    benchutil.mark_built(root, p)


def torch_worker(model_dir, data, out, batch, seq, steps, threads, attn, seed):
    """The PyTorch + PEFT loop being compared."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                                             bias="none", task_type="CAUSAL_LM"))
    model.train()
    ids = torch.tensor(list(open(data, "rb").read()), dtype=torch.int64)
    n = len(ids) // seq
    blocks = ids[: n * seq].view(n, seq)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    step_seconds = []
    for step in range(steps):
        pick = order[[(step * batch + i) % n for i in range(batch)]]
        x = blocks[pick]
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - t)
    model.save_pretrained(out)
    print(json.dumps({"after_imports": time.perf_counter() - start, "step_seconds": step_seconds,
                      "last_loss": loss.item()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lora", default="target/release/lora")
    ap.add_argument("--case", choices=sorted(CASES), default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4 if benchutil.SMALL else 20)
    ap.add_argument("--rounds", type=int, default=1 if benchutil.SMALL else 2)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--worker", nargs=9, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        w = args.worker
        torch_worker(w[0], w[1], w[2], int(w[3]), int(w[4]), int(w[5]), int(w[6]), w[7], int(w[8]))
        return
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is left out of the median)")

    case = CASES[args.case]
    batch, seq = case["batch"], case["seq"]
    root = benchutil.bench_dir(f"train-{args.case}")
    params = {"model": case["model"], "seed": 0, "data_bytes": 1 << 20}
    if not benchutil.cached(root, params):
        log(f"building the model and data.txt in {root} (once)")
        build(root, params)
    model, data = os.path.join(root, "model"), os.path.join(root, "data.txt")
    outs = {name: os.path.join(root, f"out-{name}") for name in ("lora", "torch")}
    tokens = batch * seq

    def lora():
        seconds, _ = benchutil.timed([
            args.lora, "--quiet", "train", "--base", model, "--data", data, "--out", outs["lora"],
            "--rank", str(RANK), "--alpha", str(ALPHA), "--targets", "all-linear", "--lr", str(LR),
            "--schedule", "constant", "--warmup", "0", "--weight-decay", "0", "--max-grad-norm", str(CLIP),
            "--dropout", "0", "--steps", str(args.steps), "--batch", str(batch), "--seq-len", str(seq),
            "--threads", str(args.threads), "--seed", "0", "--json"])
        with open(os.path.join(outs["lora"], "metrics.jsonl")) as f:
            steps = [json.loads(line) for line in f if line.strip()]
        return {"seconds": seconds, "step": statistics.median(tokens / s["tokens_per_second"] for s in steps[1:])}

    def torch_loop():
        seconds, out = benchutil.timed([sys.executable, os.path.abspath(__file__), "--worker", model, data,
                                        outs["torch"], str(batch), str(seq), str(args.steps), str(args.threads),
                                        args.attn, "0"])
        r = json.loads(out.strip().splitlines()[-1])
        return {"seconds": seconds, "after_imports": r["after_imports"],
                "step": statistics.median(r["step_seconds"][1:])}

    runs = benchutil.interleaved({"lora": lora, "torch": torch_loop}, args.rounds,
                                 before=lambda name: shutil.rmtree(outs[name], ignore_errors=True))
    m = case["model"]
    print(f"{args.case} llama (hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, vocab {m['vocab_size']}), "
          f"LoRA r {RANK} on all linear layers, batch {batch} x {seq} tokens, {args.steps} steps, {args.threads} "
          f"threads, PyTorch attention {args.attn}; {args.rounds} interleaved rounds, medians (load average after: "
          f"{benchutil.load_average()})")
    step_lora, step_torch = benchutil.median(runs["lora"], "step"), benchutil.median(runs["torch"], "step")
    whole_lora, whole_torch = benchutil.median(runs["lora"]), benchutil.median(runs["torch"])
    inner_torch = benchutil.median(runs["torch"], "after_imports")
    total = tokens * args.steps
    print(f"lora train      median step {tokens / step_lora:8.0f} tokens/s; whole process {total / whole_lora:8.0f} "
          f"tokens/s ({whole_lora:.2f} s)")
    print(f"PyTorch + PEFT  median step {tokens / step_torch:8.0f} tokens/s; whole process {total / whole_torch:8.0f} "
          f"tokens/s ({whole_torch:.2f} s; after imports {inner_torch:.2f} s)")
    print(f"ratio lora / PyTorch, median step     {step_torch / step_lora:5.2f}x  (target: at least 1)")
    print(f"ratio lora / PyTorch, whole process   {whole_torch / whole_lora:5.2f}x")
    print(f"ratio lora whole process / PyTorch after imports {inner_torch / whole_lora:5.2f}x")


if __name__ == "__main__":
    main()
