"""Stream the DiT blocks' frozen weights from pinned host memory, one block ahead, on a side CUDA stream.

For training on a small GPU: only the blocks in flight hold their base weights on the device. Each block
gets a forward pre-hook that (1) makes the compute stream wait for that block's copy, (2) swaps the
device copies in, (3) starts copying the next block (i + 1 in the forward pass, i - 1 while autograd runs
backward, where checkpoint recomputation walks the blocks in reverse); a forward hook swaps the host
copies back. Device copies are fresh `Parameter` / buffer objects per use, so tensors autograd saved
for backward keep their own copy alive until that block's backward has run, and nothing else does.

Cost, A14B expert with fp8 storage: 351e6 weights = 351 MB per block; at ~25 GB/s over PCIe that is
~14 ms per block against ~100 ms of block compute, so the copies hide behind the compute.
Trainable tensors (LoRA A/B) stay on the device: the optimizer owns them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


class BlockOffloader:
    """Keeps `blocks[i]`'s frozen parameters and buffers in pinned host memory between uses (module docstring).

    blocks: the DiT's `nn.ModuleList` of blocks; device: the CUDA device they compute on."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"BlockOffloader: streaming weights needs a CUDA device, got {device}")
        self.blocks = list(blocks)
        self.device = device
        self.stream = torch.cuda.Stream(device)
        # Per block: (module, "param" | "buffer", name, pinned host tensor).
        self.entries: list[list[tuple[nn.Module, str, str, Tensor]]] = [self._to_host(b) for b in self.blocks]
        self.pending: dict[int, tuple[torch.cuda.Event, list[Tensor]]] = {}
        self.entered: set[int] = set()  # blocks holding device copies now
        self.release_queued = False  # a callback at the end of this backward pass drops what is left
        self.handles = []
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(lambda m, a, i=i: self._enter(i)))
            self.handles.append(block.register_forward_hook(lambda m, a, o, i=i: self._leave(i)))

    @staticmethod
    def _to_host(block: nn.Module) -> list[tuple[nn.Module, str, str, Tensor]]:
        entries = []
        for module in block.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and not p.requires_grad:
                    host = p.detach().to("cpu").pin_memory()
                    module._parameters[name] = nn.Parameter(host, requires_grad=False)
                    entries.append((module, "param", name, host))
            for name, b in list(module._buffers.items()):
                if b is not None:
                    host = b.to("cpu").pin_memory()
                    module._buffers[name] = host
                    entries.append((module, "buffer", name, host))
        return entries

    def _prefetch(self, i: int) -> None:
        if i in self.pending or not 0 <= i < len(self.blocks):
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            copies = [host.to(self.device, non_blocking=True) for _, _, _, host in self.entries[i]]
            done = torch.cuda.Event()
            done.record(self.stream)
        self.pending[i] = (done, copies)

    def _enter(self, i: int) -> None:
        self._prefetch(i)
        done, copies = self.pending.pop(i)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        for (module, kind, name, _), t in zip(self.entries[i], copies):
            t.record_stream(compute)  # allocated on the side stream, used on this one
            if kind == "param":
                module._parameters[name] = nn.Parameter(t, requires_grad=False)
            else:
                module._buffers[name] = t
        in_backward = torch._C._current_graph_task_id() != -1
        if in_backward:
            # Checkpoint recomputation stops early, as soon as it has rebuilt what backward needs, so a
            # recomputed block's forward hook may never run. Backward reaches block i only after the
            # blocks above it are done: drop their device copies here, and the last block's once the
            # whole backward pass has finished.
            for j in [j for j in self.entered if j > i]:
                self._leave(j)
            if not self.release_queued:
                torch.autograd.Variable._execution_engine.queue_callback(self._leave_all)
                self.release_queued = True
        self.entered.add(i)
        self._prefetch(i - 1 if in_backward else i + 1)

    def _leave_all(self) -> None:
        self.release_queued = False
        for j in list(self.entered):
            self._leave(j)

    def _leave(self, i: int) -> None:
        self.entered.discard(i)
        for module, kind, name, host in self.entries[i]:
            if kind == "param":
                module._parameters[name] = nn.Parameter(host, requires_grad=False)
            else:
                module._buffers[name] = host

    def remove(self) -> None:
        """Drop the hooks; the weights stay in host memory (move the model to load them back)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


class HostCheckpointInputs:
    """Saved-tensor hooks that keep a checkpointed block's input (the residual stream) in pinned host
    memory until backward needs it again.

    With checkpointing on every block, a step stores one [B, L, dim] input per block: 40 x 0.31 GiB =
    12.5 GiB at the A14B 480p shape, half of a 24 GiB card. Non-reentrant `torch.utils.checkpoint` saves
    its inputs through the saved-tensor hooks active where it is called (its own hooks cover only the
    block's inside), so `keep(x)` around one checkpoint call sees that call's inputs; it moves `x` alone.
    The other inputs are shared by every block (timestep vectors, per-token for TI2V; text rows; RoPE
    tables): one device copy serves all blocks, where host copies would be made once per block.
    The copies run on the compute stream without blocking the host: a device tensor freed after the copy
    is reused only by later work on that stream, and the copy back in backward is ordered after it too.
    PyTorch's pinned allocator rounds each buffer up to a power of two (0.31 GiB takes 0.5 GiB) and
    caches it for the next step. On a CPU run the input is copied all the same (the path stays tested)."""

    def __init__(self):
        self.stashed = 0  # inputs moved so far

    def keep(self, x: Tensor) -> torch.autograd.graph.saved_tensors_hooks:
        """Hooks for one checkpoint call whose block input is `x`.

        The pack hook must not hold `x` itself: autograd keeps each saved tensor's hooks alive until
        backward frees it, so a closure over `x` would keep every block's device input resident (the
        12.5 GiB this class exists to free). It keeps x's address and shape instead."""
        ptr, shape = x.data_ptr(), x.shape

        def pack(t: Tensor):
            if t.data_ptr() != ptr or t.shape != shape:
                return t
            self.stashed += 1
            host = torch.empty_like(t, device="cpu", pin_memory=t.is_cuda)
            host.copy_(t, non_blocking=t.is_cuda)
            return t.device, host

        return torch.autograd.graph.saved_tensors_hooks(pack, _unpack_from_host)


def _unpack_from_host(packed):
    if isinstance(packed, tuple):
        device, host = packed
        return host.to(device, non_blocking=True)
    return packed
