"""The video size of an image-conditioned request and the image's preparation, as the official generators do.

I2V-A14B (wan/image2video.py) keeps the request's pixel area and takes the image's aspect ratio, floored to
even latent sizes, and resizes the image bicubic without clamping; TI2V-5B (wan/textimage2video.py i2v)
picks the 32-pixel-grid shape nearest the image's aspect ratio within the area (best_output_size) and
prepares the image with a Lanczos resize that covers it and a centred crop.
"""

from __future__ import annotations

import math

import torch

from .config import ModelPreset


def image_output_size(preset: ModelPreset, image_hw: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """(height, width) of a video conditioned on an image of `image_hw` pixels, as the official generators
    choose it: height x width is the pixel area, the shape follows the image's aspect ratio.

    I2V-A14B (wan/image2video.py): each side is the area's side scaled by the aspect ratio, floored to
    whole latent pixels and to an even count of them (the patch). TI2V-5B (wan/textimage2video.py i2v,
    best_output_size): floor one side to the 32-pixel grid, fit the other to the area, for width first and
    for height first, and keep the pair whose aspect ratio is closer to the image's."""
    ih, iw = image_hw
    area = height * width
    _, sh, sw = preset.vae.stride
    _, ph, pw = preset.transformer.patch_size
    if preset.task == "i2v":
        ratio = ih / iw
        lat_h = max(ph, round(math.sqrt(area * ratio) // sh // ph * ph))  # max: a side of at least one token
        lat_w = max(pw, round(math.sqrt(area / ratio) // sw // pw * pw))
        return lat_h * sh, lat_w * sw
    dh, dw = sh * ph, sw * pw
    ratio = iw / ih
    exact_w = math.sqrt(area * ratio)
    w1 = max(dw, int(exact_w // dw * dw))  # max: a side of at least one token (the official code divides by 0)
    h1 = max(dh, int(area / w1 // dh * dh))
    h2 = max(dh, int(area / exact_w // dh * dh))
    w2 = max(dw, int(area / h2 // dw * dw))

    def off(w: int, h: int) -> float:  # how far a shape's aspect ratio is from the image's, as a factor >= 1
        return max(ratio / (w / h), (w / h) / ratio)

    return (h1, w1) if off(w1, h1) < off(w2, h2) else (h2, w2)


def centre_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The largest centred crop of `image` [3, H, W] with the aspect ratio of height x width."""
    ih, iw = image.shape[-2:]
    if ih * width > iw * height:  # taller than the target: crop rows
        keep = max(1, round(iw * height / width))
        top = (ih - keep) // 2
        return image[:, top:top + keep]
    keep = max(1, round(ih * width / height))
    left = (iw - keep) // 2
    return image[:, :, left:left + keep]


def lanczos_cover_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """TI2V-5B's image preparation (wan/textimage2video.py i2v): a PIL Lanczos resize that covers height x
    width, then a centred crop to it. image: [3, H, W] in [-1, 1] (8-bit values, as read_image gives)."""
    import numpy as np
    from PIL import Image

    ih, iw = image.shape[-2:]
    scale = max(width / iw, height / ih)
    pixels = ((image.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    resized = Image.fromarray(pixels).resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    cropped = np.array(resized.crop((left, top, left + width, top + height)))
    return torch.from_numpy(cropped).permute(2, 0, 1).float() / 127.5 - 1.0
