"""Parking an idle expert in pinned host memory, so that experts that do not fit the device together
take turns on it (training.offload_inactive_expert).

Each tensor of the expert (parameters, buffers, every optimizer state tensor) gets one host buffer, made
at its first park and kept. What a park copies back is decided by what a tensor is, never by whether it
looks changed:
  * constant: parameters with requires_grad=False (the frozen base weights) and buffers (fp8 weights and
    their scales), except those training writes. Nothing writes them in LoRA training, so after an expert's
    first park their host buffers already hold their values and later parks only swap the pointer back.
  * everything else, i.e. what trains: LoRA weights, all optimizer state (Adam's moments and, for a fused or
    capturable AdamW, its device `step` counters), and the buffers training writes: running statistics of
    norm layers and those a module names in its `mutable_buffers` attribute (the FP8 attention's scaling
    states, `wan_model.cudnn_fp8_attention.attach_scaling_states`). Copied at every park.
Version counters are no guide: a fused AdamW updates weights and moments without bumping them, and a
write through `.data` bypasses them, so a "copy only what changed" rule silently puts back stale moments.
Tensors are swapped through `param.data`, so Parameter objects (the optimizer's keys, compiled code's
inputs) stay the same objects. Gradients are not parked: the trainer parks between steps, when they are
None; a park with gradients present is refused.

Host buffers made in one park share one pinned allocation: PyTorch's pinned allocator rounds each
allocation up to a power of two, which one allocation per tensor would pay per tensor.

Measured on an H200 (A14B expert, fp8 base weights, 80 GiB cap): moving a whole expert with `Module.to`
through pageable memory took 23.7 s per swap; parking, 12-15 s the first time (pinning), then 0.8-3 s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

_ALIGN = 512  # bytes: every dtype's alignment, and the copy engines' preference


@dataclass
class Slot:
    """One tensor the expert owns: where to read and write it, and whether training can change it."""

    key: tuple
    get: Callable[[], Tensor]
    set: Callable[[Tensor], None]
    constant: bool
    # Kept on the host wherever the expert is: PyTorch's own placement for an Adam-family `step` counter
    # unless the optimizer is fused or capturable (as `Optimizer.load_state_dict` places it).
    host_only: bool = False


class HostParking:
    """Moves one expert's model tensors and optimizer state between `device` and host memory.

    pin: page-locked host buffers (fast, asynchronous copies; needs CUDA). After `park()` or `unpark()`
    the copies may still be in flight on the current stream: synchronise before reading host tensors."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, pin: bool):
        self.model, self.optimizer, self.pin = model, optimizer, pin
        self.host: dict[tuple, Tensor] = {}  # slot key -> its host buffer
        self.copies = 0  # tensors copied device -> host by the last park (for tests and logs)

    def _slots(self) -> Iterator[Slot]:
        for name, p in self.model.named_parameters():
            yield Slot(("param", name), lambda p=p: p.data, lambda t, p=p: setattr(p, "data", t),
                       constant=not p.requires_grad)
        for module_name, module in self.model.named_modules():
            running_stats = isinstance(module, _NormBase) and module.track_running_stats
            written = getattr(module, "mutable_buffers", ())
            for name, b in module._buffers.items():
                if b is not None:
                    yield Slot(("buffer", module_name, name), lambda m=module, n=name: m._buffers[n],
                               lambda t, m=module, n=name: m._buffers.__setitem__(n, t),
                               constant=not (running_stats or name in written))
        host_steps = {id(p) for group in self.optimizer.param_groups for p in group["params"]
                      if not (group.get("fused") or group.get("capturable"))}
        for param, per_param in self.optimizer.state.items():
            for name, value in per_param.items():
                if isinstance(value, Tensor):
                    yield Slot(("optim", id(param), name), lambda s=per_param, n=name: s[n],
                               lambda t, s=per_param, n=name: s.__setitem__(n, t), constant=False,
                               host_only=name == "step" and id(param) in host_steps)

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
        if any(p.grad is not None for p in self.model.parameters()):
            raise RuntimeError("HostParking.park: parameters still hold gradients; park between optimizer "
                               "steps, after zero_grad(set_to_none=True)")
        slots = [s for s in self._slots() if self._needs_parking(s)]
        new = {s.key: s.get() for s in slots if s.key not in self.host}
        if new:
            self._allocate(new)
        self.copies = 0
        for s in slots:
            host = self.host[s.key]
            if s.key in new or not s.constant:
                host.copy_(s.get(), non_blocking=self.pin)
                self.copies += 1
            s.set(host)

    def unpark(self, device: torch.device) -> None:
        """Put the expert on `device` (asynchronous from pinned memory; synchronise before timing)."""
        for s in self._slots():
            t = s.get()
            # Also optimizer state that never was on the device: loaded from a checkpoint while parked.
            if t.device.type != device.type and not s.host_only:
                s.set(t.to(device, non_blocking=self.pin))

    def _needs_parking(self, s: Slot) -> bool:
        """On the device; for model tensors also in pageable host memory when parking pins (an expert
        loaded on the host). Host-only optimizer state (a non-fused AdamW's `step`) stays put."""
        t = s.get()
        if s.key[0] == "optim":
            return t.device.type != "cpu" and not s.host_only
        return t.device.type != "cpu" or (self.pin and not t.is_pinned())
