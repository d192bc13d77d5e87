"""The training objective: flow matching on cached latents, with the official I2V / TI2V conditioning."""

from __future__ import annotations

import torch
from torch import Tensor

from wan_model.conditioning import i2v_mask, token_timesteps
from wan_model.schedule import add_noise, flow_target, loss_weighting, timestep_to_sigma

from .batches import Batch


def flow_matching_loss(model: torch.nn.Module, batch: Batch, t: Tensor, noise: Tensor, task: str,
                       clean_first: Tensor | None, weighting: str) -> tuple[Tensor, Tensor]:
    """Weighted MSE of the predicted velocity; returns (mean loss, per-sample losses [B] float32).

    t: [B] train timesteps; noise: like batch.latents; clean_first: [B] bool (ti2v) or None; a one-frame
    sample (a still) is always scored in text mode."""
    x0 = batch.latents
    if x0.shape[2] == 1:
        # A still (one latent frame): given as the image, its only frame would be the answer and the loss 0/0.
        clean_first = None
    sigma = timestep_to_sigma(t)
    x_t = add_noise(x0, noise, sigma)
    target = flow_target(x0, noise)
    frame_weight = torch.ones(x0.shape[0], 1, x0.shape[2], 1, 1, device=x0.device)
    timestep = t
    if task == "i2v":
        if batch.image_cond is None:
            raise ValueError("i2v training needs image_cond in every batch; re-run prepare for an i2v preset")
        x_in = torch.cat([x_t, i2v_mask(x0), batch.image_cond.to(x_t.dtype)], dim=1)
    elif task == "ti2v" and clean_first is not None and bool(clean_first.any()):
        keep = clean_first.view(-1, 1, 1, 1, 1)
        first = torch.zeros_like(frame_weight, dtype=torch.bool)
        first[:, :, 0] = True
        x_in = torch.where(keep & first, x0, x_t)
        frame_weight = frame_weight.masked_fill(keep & first, 0.0)
        p = model_patch(model)
        grid = (x0.shape[2] // p[0], x0.shape[3] // p[1], x0.shape[4] // p[2])
        timestep = token_timesteps(t, clean_first, grid)
    else:
        x_in = x_t
    pred = model(x_in, timestep, batch.context, batch.context_lens)
    err = (pred.float() - target.float()).pow(2).mean(dim=(1, 3, 4), keepdim=True)  # [B, 1, F, 1, 1]
    per_sample = (err * frame_weight).sum(dim=(1, 2, 3, 4)) / frame_weight.sum(dim=(1, 2, 3, 4))
    per_sample = per_sample * loss_weighting(weighting, sigma.float())
    return per_sample.mean(), per_sample.detach()


def model_patch(model: torch.nn.Module) -> tuple[int, int, int]:
    inner = getattr(model, "module", model)  # DDP / DeepSpeed wrap the WanTransformer
    return inner.config.patch_size
