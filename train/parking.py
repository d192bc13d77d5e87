"""Parking an idle expert in pinned host memory, so that experts that do not fit the device together
take turns on it (training.offload_inactive_expert).

Each tensor of the expert (parameters, buffers, the optimizer's moments) gets one host buffer, made at
its first park and kept. A park copies a tensor into its buffer only when it changed on the device since
it was unparked (its version counter moved: optimizer steps, in-place updates). The frozen base weights,
bf16 parameters or fp8 buffers, never do: after the first park of an expert they are not copied back
again, and an unpark copies the pinned buffers in at full bus speed. Tensors are swapped through
`param.data`, so Parameter objects (the optimizer's keys, compiled code's inputs) stay the same objects.

Host buffers made in one park share one pinned allocation: PyTorch's pinned allocator rounds each
allocation up to a power of two, which one allocation per tensor would pay per tensor.

Measured on an H200 (A14B expert, fp8 base weights, 80 GiB cap): moving a whole expert with `Module.to`
through pageable memory took 23.7 s per swap; parking, 12-15 s the first time (pinning), then 0.8-3 s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
from torch import Tensor

_ALIGN = 512  # bytes: every dtype's alignment, and the copy engines' preference

Slot = tuple[tuple, Callable[[], Tensor], Callable[[Tensor], None], Callable[[], int]]


class HostParking:
    """Moves one expert's model tensors and optimizer state between `device` and host memory.

    pin: page-locked host buffers (fast, asynchronous copies; needs CUDA)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, pin: bool):
        self.model, self.optimizer, self.pin = model, optimizer, pin
        self.host: dict[tuple, Tensor] = {}  # slot -> its host buffer
        self.unparked_version: dict[tuple, int] = {}  # slot -> version counter when it went to the device

    def _slots(self) -> Iterator[Slot]:
        """(key, get, set, version) for every parameter, buffer and optimizer state tensor."""
        for name, p in self.model.named_parameters():
            yield ("param", name), (lambda p=p: p.data), (lambda t, p=p: setattr(p, "data", t)), \
                (lambda p=p: p._version)
        for module_name, module in self.model.named_modules():
            for name, b in module._buffers.items():
                if b is not None:
                    yield (("buffer", module_name, name), (lambda m=module, n=name: m._buffers[n]),
                           (lambda t, m=module, n=name: m._buffers.__setitem__(n, t)),
                           (lambda m=module, n=name: m._buffers[n]._version))
        for param, per_param in self.optimizer.state.items():
            for name, value in per_param.items():
                if isinstance(value, Tensor) and value.ndim > 0:
                    yield (("optim", id(param), name), (lambda s=per_param, n=name: s[n]),
                           (lambda t, s=per_param, n=name: s.__setitem__(n, t)),
                           (lambda s=per_param, n=name: s[n]._version))

    def _allocate(self, tensors: dict[tuple, Tensor]) -> None:
        """One pinned slab holding a host buffer for each of `tensors` (key -> the tensor to mirror)."""
        sizes = {k: -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN for k, t in tensors.items()}
        slab = torch.empty(sum(sizes.values()), dtype=torch.uint8, pin_memory=self.pin)
        offset = 0
        for key, t in tensors.items():
            n = t.numel() * t.element_size()
            self.host[key] = slab[offset:offset + n].view(t.dtype).view(t.shape)
            offset += sizes[key]

    def park(self) -> None:
        """Put the expert in host memory; the device copies are freed once nothing else holds them."""
        slots = [s for s in self._slots() if _needs_parking(s[1](), self.pin)]
        new = {key: get() for key, get, _, _ in slots if key not in self.host}
        if new:
            self._allocate(new)
        for key, get, set_, version in slots:
            host = self.host[key]
            if key in new or version() != self.unparked_version.get(key):
                host.copy_(get(), non_blocking=self.pin)
            set_(host)

    def unpark(self, device: torch.device) -> None:
        """Put the expert on `device` (asynchronous from pinned memory; synchronise before timing)."""
        for key, get, set_, version in self._slots():
            t = get()
            if t.device.type != device.type:
                set_(t.to(device, non_blocking=self.pin))
                self.unparked_version[key] = version()


def _needs_parking(t: Tensor, pin: bool) -> bool:
    """On the device, or in pageable host memory when parking pins (an expert loaded on the host)."""
    return t.device.type != "cpu" or (pin and not t.is_pinned())
