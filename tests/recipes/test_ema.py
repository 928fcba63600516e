import torch
from torch import nn

from sslab.recipes.ema import ema_update, frozen_copy


def test_ema_update_matches_formula_and_copies_buffers():
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    target = frozen_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    before = [p.clone() for p in target.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    online(torch.randn(5, 3))  # moves BN running stats
    ema_update(target, online, 0.9)
    for b, t, o in zip(before, target.parameters(), online.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    torch.testing.assert_close(target[1].running_mean, online[1].running_mean)


def test_momentum_one_keeps_target_and_zero_copies_online():
    online = nn.Linear(2, 2)
    target = frozen_copy(online)
    with torch.no_grad():
        online.weight.add_(1.0)
    keep = target.weight.clone()
    ema_update(target, online, 1.0)
    torch.testing.assert_close(target.weight, keep)
    ema_update(target, online, 0.0)
    torch.testing.assert_close(target.weight, online.weight)
