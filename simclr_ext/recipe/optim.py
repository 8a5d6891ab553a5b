"""Optimizers and learning-rate schedules of the SimCLR recipe.

LARS (You et al. 2017, "Large Batch Training of Convolutional Networks") as used by SimCLR: biases and
BatchNorm parameters get neither weight decay nor the layer-wise trust ratio. Linear warmup then cosine
decay (per step), and the paper's batch-size scaling rules for the base learning rate.
"""
import math

import torch
from torch import nn

__all__ = ["LARS", "param_groups", "build_optimizer", "scaled_lr", "WarmupCosine", "build_scheduler"]

OPTIMIZERS = ("lars", "sgd", "adamw")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio.

    For a parameter w with gradient g: d = g + weight_decay * w; when `lars_adapt` is on for its group,
    d *= trust_coefficient * |w| / |d| (left at 1 when either norm is 0); buf = momentum * buf + d;
    w -= lr * buf. Groups built by `param_groups` switch weight decay and adaptation off for biases and
    BatchNorm parameters (every parameter with fewer than 2 dimensions).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 trust_coefficient: float = 0.001, eps: float = 0.0):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, lars_adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"] != 0:
                    d = d.add(p, alpha=group["weight_decay"])
                if group["lars_adapt"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = group["trust_coefficient"] * w_norm / (d_norm + group["eps"])
                    d = d * torch.where((w_norm > 0) & (d_norm > 0), trust, torch.ones_like(trust))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.detach().clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float):
    """Two groups: weights of conv/linear layers (decayed, LARS-adapted) and biases + BatchNorm
    parameters (no decay, no adaptation), as in SimCLR."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay, lars_adapt=True),
            dict(params=no_decay, weight_decay=0.0, lars_adapt=False)]


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9):
    """"lars", "sgd" (momentum, Nesterov off) or "adamw"; biases and BN excluded from weight decay."""
    groups = param_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for g in groups:
        g.pop("lars_adapt")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")


def scaled_lr(base_lr: float, batch_size: int, rule: str = "linear") -> float:
    """SimCLR's rules: "linear": base_lr * batch_size / 256; "sqrt": base_lr * sqrt(batch_size);
    "none": base_lr unchanged."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if rule == "none":
        return base_lr
    raise ValueError(f"lr scaling rule must be 'linear', 'sqrt' or 'none', got {rule!r}")


class WarmupCosine:
    """Multiplier of the base lr at optimizer step `step`: linear warmup from 1/warmup_steps to 1,
    then cosine decay to 0 at total_steps. A class (not a lambda) so LambdaLR can checkpoint it."""

    def __init__(self, warmup_steps: int, total_steps: int):
        if total_steps < 1 or warmup_steps < 0:
            raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
        self.warmup_steps = min(warmup_steps, total_steps)
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps))
