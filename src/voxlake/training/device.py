"""Move a stream batch to the device, normalising stored-dtype images there.

With ``VolumeStream(output="stored")`` the loader delivers images in the stored dtype
(int16 for CT: half the bytes of float32 to write, share between processes, pin and
copy) together with each sample's ``normalization`` parameters;
:func:`normalize_on_device` turns them into exactly the float32 images the default
``output="float32"`` delivers, on the device that trains on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["normalize_on_device"]


def _to_device(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return value.to(device)
    # Pinned pages let the copy run asynchronously with respect to the host.
    if not value.is_pinned():
        value = value.pin_memory()
    return value.to(device, non_blocking=True)


def _normalize_on_cpu(image: torch.Tensor, params: torch.Tensor, *, clip: bool) -> torch.Tensor:
    # numpy, with the stream's own arithmetic: torch's CPU kernels run on an OpenMP pool
    # that measured several times slower than plain loops on a loaded small machine, and
    # numpy's large allocations get transparent huge pages.
    out = np.empty(tuple(image.shape), np.float32)
    for data, target, (shift, scale, low, high) in zip(
        image.numpy(), out, params.numpy(), strict=True
    ):
        np.subtract(data, shift, out=target, dtype=np.float32, casting="unsafe")
        target *= scale
        if clip:
            np.clip(target, low, high, out=target)
    return torch.from_numpy(out)


def _normalize_with_torch(image: torch.Tensor, params: torch.Tensor, *, clip: bool) -> torch.Tensor:
    view = (-1,) + (1,) * (image.dim() - 1)
    shift, scale, low, high = (params[:, i].reshape(view) for i in range(4))
    if image.is_floating_point() and image.dtype != torch.float32:
        image = image.to(torch.float32)  # the stream converts to float32 first, too
    # Two passes: convert and subtract in one kernel (int16 - float32 tensor computes in
    # float32, as the stream does), then scale in place.
    result = torch.empty(image.shape, dtype=torch.float32, device=image.device)
    torch.sub(image, shift, out=result)
    result.mul_(scale)
    if clip:
        torch.maximum(result, low, out=result)
        torch.minimum(result, high, out=result)
    return result


def _padded(valid: torch.Tensor, image: torch.Tensor) -> bool:
    """Whether any ``valid`` box (``(..., 3, 2)`` start/stop) leaves padding in ``image``."""
    boxes = valid.cpu().numpy().reshape(-1, 3, 2)  # no copy when on the host already
    sizes = np.asarray(image.shape[-3:])
    return bool((boxes[:, :, 0] != 0).any() or (boxes[:, :, 1] != sizes).any())


def normalize_on_device(
    batch: Mapping[str, Any], device: torch.device | str, *, key: str = "image"
) -> dict[str, Any]:
    """``batch`` with its tensors on ``device`` and ``batch[key]`` normalised to float32.

    Parameters
    ----------
    batch
        A batch of stream samples (collated, images ``(B, C, D, H, W)``) or one sample
        (``(C, D, H, W)``). Without a ``normalization`` entry (``output="float32"``
        streams) the image is only moved.
    device
        Where to put the tensors. On CUDA they are copied from pinned memory with
        ``non_blocking=True``.
    key
        Entry holding the image.

    Returns
    -------
    dict
        A new dictionary: every tensor on ``device``, ``batch[key]`` as float32
        ``clip((float32(x) - shift) * scale, low, high)`` with each sample's
        ``normalization = (shift, scale, low, high)``, then 0 outside its ``valid`` box
        (patch padding), and the ``normalization`` and ``valid`` entries removed. The
        arithmetic is the stream's own, in float32, so the images equal the
        ``output="float32"`` stream's bit for bit.
    """
    device = torch.device(device)
    params = batch.get("normalization")
    valid = batch.get("valid")
    # Decided on the host, before the copy: asking the device would synchronise. Each
    # kernel or copy saved counts: a small model's step is bound by kernel launches.
    clip = params is not None and bool(np.isfinite(params[..., 2:].cpu().numpy()).any())
    if params is not None and valid is not None and not _padded(valid, batch[key]):
        valid = None
    out = {
        name: _to_device(value, device) if isinstance(value, torch.Tensor) else value
        for name, value in batch.items()
        if name not in ("normalization", "valid")
    }
    if params is None:
        return out
    params = _to_device(params, device)
    valid = None if valid is None else _to_device(valid, device)
    image = out[key]
    single = params.dim() == 1
    if single:
        image, params = image.unsqueeze(0), params.unsqueeze(0)
        valid = None if valid is None else valid.unsqueeze(0)
    params = params.to(torch.float32)
    if image.device.type == "cpu":
        result = _normalize_on_cpu(image, params, clip=clip)
    else:
        result = _normalize_with_torch(image, params, clip=clip)
    if valid is not None:
        # (B, 3, 2) start/stop of the voxels read along z, y, x: the rest is padding, 0
        # after normalisation as in the float32 stream.
        for axis in range(3):
            dim = image.dim() - 3 + axis
            positions = torch.arange(image.shape[dim], device=result.device)
            inside = (positions >= valid[:, axis, :1]) & (positions < valid[:, axis, 1:])
            shape = [1] * image.dim()
            shape[0], shape[dim] = image.shape[0], image.shape[dim]
            result.masked_fill_(~inside.reshape(shape), 0.0)
    out[key] = result[0] if single else result
    return out
