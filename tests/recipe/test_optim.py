"""LARS, parameter groups, the warmup-cosine schedule and the lr scaling rules."""
import math

import pytest
import torch
from torch import nn

from simclr_ext.recipe.optim import LARS, WarmupCosine, build_optimizer, build_scheduler, param_groups, scaled_lr


def _net():
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))


def test_param_groups_exclude_biases_and_batchnorm():
    net = _net()
    decay, no_decay = param_groups(net, 1e-4)
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(net[0].bias), id(net[1].weight), id(net[1].bias), id(net[3].bias)}
    assert decay["weight_decay"] == 1e-4 and decay["lars_adapt"]
    assert no_decay["weight_decay"] == 0 and not no_decay["lars_adapt"]


def test_lars_step_matches_the_formula():
    torch.manual_seed(0)
    net = _net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    lr, wd, eta = 0.7, 1e-3, 0.001
    opt = LARS(param_groups(net, wd), lr=lr, momentum=0.9, weight_decay=wd, trust_coefficient=eta)
    net(torch.randn(8, 5)).pow(2).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    opt.step()
    for n, p in net.named_parameters():
        w, g = before[n], grads[n]
        if p.ndim >= 2:  # decayed and adapted
            d = g + wd * w
            expected = w - lr * eta * w.norm() / d.norm() * d
        else:            # bias / BN: plain momentum SGD step (first step: buffer = gradient)
            expected = w - lr * g
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)


def test_lars_momentum_accumulates():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = LARS([dict(params=[p], weight_decay=0.0, lars_adapt=False)], lr=0.1, momentum=0.5)
    for _ in range(2):
        p.grad = torch.tensor([1.0, 1.0])
        opt.step()
    # buffer: 1, then 0.5 * 1 + 1 = 1.5; total moved 0.1 * (1 + 1.5)
    torch.testing.assert_close(p.detach(), torch.tensor([1.0 - 0.25, -2.0 - 0.25]))


def test_lars_trains_a_regression():
    torch.manual_seed(1)
    x = torch.randn(256, 10)
    y = x @ torch.randn(10, 1) + 0.01 * torch.randn(256, 1)
    model = nn.Linear(10, 1)
    opt = LARS(param_groups(model, 0.0), lr=0.1, momentum=0.9, weight_decay=0.0, trust_coefficient=0.02)
    first = None
    for _ in range(300):
        loss = (model(x) - y).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


@pytest.mark.parametrize("name,cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_build_optimizer(name, cls):
    opt = build_optimizer(name, _net(), lr=0.1, weight_decay=1e-4)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer("adam", _net(), 0.1, 0.0)
    with pytest.raises(ValueError, match="lr must be"):
        LARS(_net().parameters(), lr=-1)
    with pytest.raises(ValueError, match="lr scaling rule"):
        scaled_lr(0.3, 256, "quadratic")
    with pytest.raises(ValueError, match="batch_size"):
        scaled_lr(0.3, 0)


def test_scaled_lr_rules():
    assert scaled_lr(0.3, 512, "linear") == pytest.approx(0.6)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(0.075 * 64)
    assert scaled_lr(0.1, 1000, "none") == 0.1


def test_warmup_cosine_shape():
    f = WarmupCosine(warmup_steps=10, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert WarmupCosine(0, 4)(0) == pytest.approx(1.0)


def test_scheduler_state_round_trip():
    net = _net()
    opt = build_optimizer("sgd", net, 0.5, 0.0)
    sched = build_scheduler(opt, 3, 20)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer("sgd", _net(), 0.5, 0.0)
    sched2 = build_scheduler(opt2, 5, 50)  # different; the state restores the checkpointed schedule
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 5 / 17)))
