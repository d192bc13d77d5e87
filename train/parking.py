"""Parking an idle expert in pinned host memory, so that experts that do not fit the device together
take turns on it (training.offload_inactive_expert).

LoRA training never changes the frozen base weights, so their host copy is made once, at the first park:
a later park only drops the device copy, and an unpark copies the pinned host copy in at full bus speed.
Trainable tensors (the LoRA weights), buffers and the optimizer's moments change on the device; each park
copies them into pinned host buffers kept from the first park. Tensors are swapped through `param.data`,
so Parameter objects (the optimizer's keys, compiled code's inputs) stay the same objects.

Measured on an H200 (A14B expert, fp8 base weights, 80 GiB cap): moving a whole expert with `Module.to`
through pageable memory took 23.7 s per swap; see docs/benchmarks.md for the parked swap.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


class HostParking:
    """Moves one expert's model tensors and optimizer state between `device` and host memory.

    pin: page-locked host buffers (fast, asynchronous copies; needs CUDA). The host holds each frozen
    weight once, whether the expert is parked or not."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, pin: bool):
        self.model, self.optimizer, self.pin = model, optimizer, pin
        self.host: dict[tuple, Tensor] = {}  # slot -> host tensor (frozen weights: their lasting copy)

    def _to_host(self, key: tuple, t: Tensor, reuse: bool) -> Tensor:
        """`t` on the host under `key`: the kept copy when `reuse` (frozen), else copied into the kept buffer."""
        host = self.host.get(key)
        if host is not None and reuse:
            return host
        if host is None:
            host = torch.empty_like(t, device="cpu", pin_memory=self.pin)
            self.host[key] = host
        host.copy_(t, non_blocking=self.pin)
        return host

    def _slots(self):
        """(key, getter, setter, frozen) for every parameter, buffer and optimizer state tensor."""
        for name, p in self.model.named_parameters():
            yield ("param", name), (lambda p=p: p.data), (lambda t, p=p: setattr(p, "data", t)), not p.requires_grad
        for module_name, module in self.model.named_modules():
            for name, b in module._buffers.items():
                if b is not None:
                    yield (("buffer", module_name, name), (lambda m=module, n=name: m._buffers[n]),
                           (lambda t, m=module, n=name: m._buffers.__setitem__(n, t)), False)
        for param, per_param in self.optimizer.state.items():
            for name, value in per_param.items():
                if isinstance(value, Tensor) and value.ndim > 0:
                    yield (("optim", id(param), name), (lambda s=per_param, n=name: s[n]),
                           (lambda t, s=per_param, n=name: s.__setitem__(n, t)), False)

    def park(self) -> None:
        """Put the expert in host memory; the device copies are freed once nothing else holds them."""
        for key, get, set_, frozen in self._slots():
            t = get()
            if t.device.type == "cpu" and (not self.pin or t.is_pinned()):
                continue
            set_(self._to_host(key, t, reuse=frozen))

    def unpark(self, device: torch.device) -> None:
        """Put the expert on `device` (asynchronous from pinned memory; synchronise before timing)."""
        for _, get, set_, _ in self._slots():
            t = get()
            if t.device.type != device.type:
                set_(t.to(device, non_blocking=self.pin))
