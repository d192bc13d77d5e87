"""HostParking: an expert parked in pinned host memory comes back with the same weights and optimizer
state, whatever the optimizer implementation; everything that trains is copied at every park, frozen
weights only at the first."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from train.parking import HostParking

# The AdamW implementations a trainer may run: foreach (the default on CUDA), fused and plain loops.
# foreach leaves exp_avg's version counter unchanged, fused every counter: a version rule loses updates.
OPTIMIZERS = {"foreach": dict(foreach=True), "fused": dict(fused=True), "loop": dict(foreach=False),
              "capturable": dict(foreach=True, capturable=True)}


def adam_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(8, 64, device="cuda")).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    out = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    for i, state in enumerate(optimizer.state.values()):
        out.update({f"optim{i}.{k}": v.detach().cpu().clone() for k, v in state.items()})
    return out


def same(a: dict, b: dict, skip=()) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k not in skip)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_park_and_unpark_round_trip(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).cuda()
    model[0].requires_grad_(False)  # the frozen base weight
    model[0].register_buffer("scale", torch.rand(64, device="cuda"))  # a constant buffer (as fp8 scales)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, **OPTIMIZERS[kind])
    adam_step(model, optimizer)
    state_tensors = sum(len(s) for s in optimizer.state.values())
    steps_on_device = all(s["step"].is_cuda for s in optimizer.state.values())
    assert steps_on_device == (kind in ("fused", "capturable"))
    parking = HostParking(model, optimizer, pin=True)
    before = snapshot(model, optimizer)

    parking.park()
    torch.cuda.synchronize()
    assert all(p.device.type == "cpu" and p.is_pinned() for p in model.parameters())
    assert model[0].scale.is_pinned()
    assert all(not v.is_cuda for s in optimizer.state.values() for v in s.values())
    frozen_host = model[0].weight.data_ptr()
    parking.unpark(torch.device("cuda"))
    torch.cuda.synchronize()
    assert all(p.is_cuda for p in model.parameters()) and model[0].scale.is_cuda
    # Optimizer state goes back where it was: a loop AdamW's `step` stays a CPU tensor.
    assert all(s["step"].is_cuda == steps_on_device for s in optimizer.state.values())
    assert same(snapshot(model, optimizer), before)

    adam_step(model, optimizer)  # the trainable weights and every moment change on the device
    trained = snapshot(model, optimizer)
    assert not same(trained, before)
    # A write through .data is invisible to version counters; the frozen weight is constant by what it
    # is (requires_grad=False), so the second park keeps the first park's copy and does not copy it again.
    model[0].weight.data.add_(1.0)
    parking.park()
    torch.cuda.synchronize()
    assert parking.copies == len(trainable) + (state_tensors if steps_on_device else state_tensors - len(trainable))
    assert model[0].weight.data_ptr() == frozen_host
    assert torch.equal(model[0].weight.detach().cpu(), before["0.weight"])
    parked = snapshot(model, optimizer)
    assert same(parked, trained, skip={"0.weight"})  # every trained tensor and moment, none stale

    parking.unpark(torch.device("cuda"))
    adam_step(model, optimizer)  # training goes on from the parked state: the third park sees it too
    trained = snapshot(model, optimizer)
    parking.park()
    torch.cuda.synchronize()
    assert same(snapshot(model, optimizer), trained, skip={"0.weight"})

    # A checkpoint loaded while the expert is parked: load_state_dict places the state on the parameters'
    # device (the host, now), in fresh tensors; the next unpark must still bring it all to the device.
    saved = copy.deepcopy(optimizer.state_dict())
    optimizer.load_state_dict(saved)
    parking.unpark(torch.device("cuda"))
    torch.cuda.synchronize()
    for state in optimizer.state.values():
        assert all(v.is_cuda == (k != "step" or steps_on_device) for k, v in state.items()), kind
    adam_step(model, optimizer)  # state on mixed devices would raise here
    trained = snapshot(model, optimizer)
    parking.park()
    torch.cuda.synchronize()
    assert same(snapshot(model, optimizer), trained, skip={"0.weight"})


@pytest.mark.gpu
def test_park_refuses_pending_gradients():
    model = nn.Linear(8, 8).cuda()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8, device="cuda")).sum().backward()
    with pytest.raises(RuntimeError, match="gradients"):
        HostParking(model, optimizer, pin=True).park()


def test_buffers_are_constant_unless_training_writes_them():
    """Frozen weights and plain buffers are constant (copied at the first park only); running statistics and
    buffers a module names in `mutable_buffers` (the FP8 attention's scaling states) are copied at every park."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    model[0].requires_grad_(False)
    model[0].register_buffer("scale", torch.ones(4))
    model[2].register_buffer("fp8_scaling", torch.zeros(8))
    model[2].mutable_buffers = ("fp8_scaling",)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    constant = {s.key: s.constant for s in HostParking(model, optimizer, pin=False)._slots()}
    assert constant[("param", "0.weight")] and constant[("buffer", "0", "scale")]
    assert not constant[("param", "2.weight")] and not constant[("buffer", "2", "fp8_scaling")]
    assert not constant[("buffer", "1", "running_mean")] and not constant[("buffer", "1", "num_batches_tracked")]


@pytest.mark.gpu
def test_buffers_training_writes_come_back_as_last_written():
    """A scaling state written in place on the device between parks comes back with its last values (before,
    every park after the first put back the first park's copy: the state before training)."""
    model = nn.Linear(8, 8).cuda()
    model.register_buffer("fp8_scaling", torch.zeros(8, device="cuda"))
    model.mutable_buffers = ("fp8_scaling",)
    parking = HostParking(model, torch.optim.AdamW(model.parameters()), pin=True)
    parking.park()
    for value in (3.0, 5.0):
        parking.unpark(torch.device("cuda"))
        model.fp8_scaling.fill_(value)  # as the attention ops update it
        parking.park()
        torch.cuda.synchronize()
        assert torch.equal(model.fp8_scaling, torch.full((8,), value))
    parking.unpark(torch.device("cuda"))
    torch.cuda.synchronize()
    assert model.fp8_scaling.is_cuda and torch.equal(model.fp8_scaling.cpu(), torch.full((8,), 5.0))
