"""Ulysses sequence parallelism (wan_model/sequence_parallel.py) on 2 CPU processes (gloo) against 1 process."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wan_model.config import PRESETS
from wan_model.sequence_parallel import SequenceParallel
from wan_model.transformer import WanTransformer


def _inputs(preset: str):
    cfg = PRESETS[preset].transformer
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, cfg.in_dim, 3, 4, 6, generator=g)  # 3 x 2 x 3 = 18 tokens: 9 per process
    tokens = 3 * 2 * 3
    timestep = torch.tensor([700.0, 80.0])
    if cfg.model_type == "ti2v":
        timestep = timestep[:, None].expand(2, tokens).clone()
        timestep[:, :6] = 0.0  # the first frame's tokens are clean
    context = torch.randn(2, 7, cfg.text_dim, generator=g)
    return latents, timestep, context, torch.tensor([7, 4])


def _model(preset: str) -> WanTransformer:
    torch.manual_seed(0)
    model = WanTransformer(PRESETS[preset].transformer)
    torch.nn.init.normal_(model.head.head.weight, std=0.1)  # the official init zeroes it
    return model


def _worker(rank: int, port: int, preset: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = _model(preset)
    model.enable_gradient_checkpointing(True)
    model.enable_sequence_parallel(SequenceParallel())
    out = model(*_inputs(preset))
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.save((out.detach(), grads), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-ti2v"])
def test_two_processes_give_the_one_process_output_and_gradients(preset, tmp_path):
    model = _model(preset)
    out = model(*_inputs(preset))
    out.square().mean().backward()
    expected = {n: p.grad for n, p in model.named_parameters()}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(rank, port, preset, str(tmp_path))) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    results = {rank: torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)}
    for rank in range(2):  # every process returns the whole prediction
        torch.testing.assert_close(results[rank][0], out.detach(), rtol=1e-5, atol=1e-6)
    for name, grad in expected.items():  # each holds its shard's share: the sum is the full gradient
        torch.testing.assert_close(results[0][1][name] + results[1][1][name], grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
