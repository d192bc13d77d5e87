"""HostParking: an expert parked in pinned host memory comes back with the same weights and optimizer
moments; frozen weights are copied to the host once and reused by every later park."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from train.parking import HostParking

pytestmark = pytest.mark.gpu


def adam_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(8, 64, device="cuda")).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    out = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    for i, state in enumerate(optimizer.state.values()):
        out.update({f"optim{i}.{k}": v.detach().cpu().clone() for k, v in state.items() if v.ndim})
    return out


def test_park_and_unpark_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).cuda()
    model[0].requires_grad_(False)  # the frozen base weight
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    adam_step(model, optimizer)
    parking = HostParking(model, optimizer, pin=True)
    before = snapshot(model, optimizer)

    parking.park()
    torch.cuda.synchronize()
    assert all(p.device.type == "cpu" and p.is_pinned() for p in model.parameters())
    assert all(v.device.type == "cpu" for s in optimizer.state.values() for v in s.values() if v.ndim)
    frozen_host = model[0].weight.data_ptr()
    parking.unpark(torch.device("cuda"))
    torch.cuda.synchronize()
    assert all(p.is_cuda for p in model.parameters())
    after = snapshot(model, optimizer)
    assert all(torch.equal(after[k], before[k]) for k in before)

    adam_step(model, optimizer)  # the trainable weights and moments change on the device
    trained = snapshot(model, optimizer)
    # A write through .data bypasses the Parameter's version counter: parking cannot see it, so the
    # unchanged-weight rule shows as the first park's values coming back.
    model[0].weight.data.add_(1.0)
    parking.park()
    torch.cuda.synchronize()
    assert model[0].weight.data_ptr() == frozen_host  # the first park's buffer
    assert torch.equal(model[0].weight.detach().cpu(), before["0.weight"])  # not copied again
    parked = snapshot(model, optimizer)
    assert all(torch.equal(parked[k], trained[k]) for k in trained if k != "0.weight")
