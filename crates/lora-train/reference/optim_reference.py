"""Reference numbers for lora-train's optimizer unit tests (src/optim_tests.rs), made by the real
torch.optim.AdamW, torch.nn.utils.clip_grad_norm_ and transformers' schedules.

Run: /work/venv/bin/python crates/lora-train/reference/optim_reference.py > crates/lora-train/reference/optim_reference.json
Not needed at test time (the JSON is committed).
"""
import json
import math

import torch
import transformers
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

torch.set_default_dtype(torch.float64)


def grads_at(step, shape, salt):
    n = shape[0] * shape[1]
    return torch.tensor(
        [math.sin(0.7 * (i + 1) * (step + 1) + salt) * (0.5 + 0.1 * i) for i in range(n)]
    ).reshape(shape)


# AdamW: two tensors (like A (2, 3) and B (3, 2)), 6 steps, a changing learning rate
a0 = torch.tensor([[0.1, -0.2, 0.3], [0.4, -0.5, 0.6]])
b0 = torch.tensor([[0.05, -0.15], [0.25, 0.35], [-0.45, 0.55]])
a = a0.clone().requires_grad_(True)
b = b0.clone().requires_grad_(True)
lrs = [0.0, 0.01, 0.02, 0.015, 0.01, 0.005]
opt = torch.optim.AdamW([a, b], lr=lrs[0], betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=False)
grads = []
for t, lr in enumerate(lrs):
    for g in opt.param_groups:
        g["lr"] = lr
    ga, gb = grads_at(t, (2, 3), 0.0), grads_at(t, (3, 2), 1.0)
    grads.append({"a": ga.tolist(), "b": gb.tolist()})
    a.grad, b.grad = ga.clone(), gb.clone()
    opt.step()
st = opt.state[a]
adamw = {
    "a0": a0.tolist(), "b0": b0.tolist(), "lrs": lrs, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1,
    "grads": grads, "a": a.detach().tolist(), "b": b.detach().tolist(),
    "exp_avg_a": st["exp_avg"].tolist(), "exp_avg_sq_a": st["exp_avg_sq"].tolist(),
}

# clip_grad_norm_: norm 2 over two tensors, clipped to 1.0, and one case below the limit
def clip_case(scale, max_norm):
    p1 = torch.zeros(2, 3, requires_grad=True)
    p2 = torch.zeros(3, 2, requires_grad=True)
    p1.grad = grads_at(3, (2, 3), 0.3) * scale
    p2.grad = grads_at(3, (3, 2), 0.9) * scale
    before = {"a": p1.grad.tolist(), "b": p2.grad.tolist()}
    norm = torch.nn.utils.clip_grad_norm_([p1, p2], max_norm)
    return {"max_norm": max_norm, "grads": before, "norm": float(norm), "a": p1.grad.tolist(), "b": p2.grad.tolist()}

clip = [clip_case(1.0, 1.0), clip_case(0.1, 1.0)]

# schedules: lambda(step) for 12 steps, warmup 3
def lambdas(make, total, warmup):
    p = torch.zeros(1, requires_grad=True)
    o = torch.optim.SGD([p], lr=1.0)
    s = make(o, warmup, total) if make is not get_constant_schedule_with_warmup else make(o, warmup)
    out = []
    for _ in range(total + 2):
        out.append(o.param_groups[0]["lr"])
        o.step()
        s.step()
    return out

schedules = {
    "warmup": 3, "total": 12,
    "constant": lambdas(get_constant_schedule_with_warmup, 12, 3),
    "linear": lambdas(get_linear_schedule_with_warmup, 12, 3),
    "cosine": lambdas(get_cosine_schedule_with_warmup, 12, 3),
}

print(json.dumps({
    "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    "adamw": adamw, "clip": clip, "schedules": schedules,
}, indent=1))
