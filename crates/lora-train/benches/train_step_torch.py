#!/usr/bin/env python3
"""PyTorch + PEFT counterpart of train_step.rs: forward + backward tokens/s on the same configs.

    /work/venv/bin/python crates/lora-train/benches/train_step_torch.py --case bench --threads 2
    /work/venv/bin/python crates/lora-train/benches/train_step_torch.py --case tiny --threads 2

Same model shapes, LoRA r = 16 (alpha 32) on all linear layers, random weights and token ids;
f32 on the CPU, eager attention (transformers' default sdpa is also measured with --attn sdpa).
Prints tokens/s for forward + backward (loss.backward(), the base frozen) and for the forward
pass alone under no_grad, and the peak resident memory of the process.
"""
import argparse
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

CASES = {
    "bench": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8192, batch=8, seq=256),
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=8192, batch=8, seq=64),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=sorted(CASES), default="bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--attn", default="eager")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    c = dict(CASES[args.case])
    batch, seq = c.pop("batch"), c.pop("seq")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**c, max_position_embeddings=seq, attn_implementation=args.attn))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    ids = torch.randint(0, c["vocab_size"], (batch, seq))
    tokens = batch * seq

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    def forward():
        with torch.no_grad():
            model(input_ids=ids, labels=ids)

    for name, fn in [("forward_backward", step), ("forward", forward)]:
        fn()  # warm-up
        fn()
        t = time.perf_counter()
        for _ in range(args.steps):
            fn()
        dt = (time.perf_counter() - t) / args.steps
        print(f"{args.case} {name}: {dt * 1e3:.1f} ms/step, {tokens / dt:.0f} tokens/s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.case} peak RSS: {peak:.0f} MB (threads {torch.get_num_threads()}, attn {args.attn}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
