"""Process-group plumbing for :mod:`voxlake.training.train` (no-ops on a single rank)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

__all__ = [
    "all_gather_objects",
    "barrier",
    "broadcast_object",
    "check_gpus_per_rank",
    "cuda_device_count",
    "is_distributed",
    "restore_rng",
    "rng_state",
    "setup_distributed",
    "weights_digest",
]


def check_gpus_per_rank(ranks: int, gpus: int) -> None:
    """Refuse ``ranks`` local ranks on ``gpus`` CUDA devices (one GPU per rank).

    ``gpus`` is 0 on a machine without CUDA: then the ranks run on CPU (gloo).
    """
    from voxlake.errors import ConfigError

    if gpus and ranks > gpus:
        raise ConfigError(
            f"{ranks} ranks on this machine need one GPU each, but it has {gpus}",
            hint=f"use --nproc {gpus}, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run "
            "the ranks on CPU with gloo",
        )


def cuda_device_count() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def setup_distributed() -> tuple[bool, torch.device]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` and none exists yet.

    NCCL when CUDA is available (one GPU per rank, chosen by ``LOCAL_RANK``), gloo
    otherwise. Returns whether this call created the group (the caller then destroys it)
    and the device this rank computes on.
    """
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # LOCAL_WORLD_SIZE: ranks on this node (torchrun sets it).
        check_gpus_per_rank(
            int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)), cuda_device_count()
        )
        torch.cuda.set_device(local_rank)
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        created = True
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return created, device


def is_distributed() -> bool:
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` in rank order (``[value]`` on a single rank)."""
    import torch.distributed as dist

    if not is_distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank."""
    import torch.distributed as dist

    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op on a single rank)."""
    import torch.distributed as dist

    if is_distributed():
        dist.barrier()


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names and raw bytes), to check DDP replicas agree."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch random state (CPU, and CUDA when ``device`` is a GPU)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(states: list[dict[str, torch.Tensor]] | None, rank: int, world_size: int) -> None:
    """Restore this rank's entry of ``states`` (every rank's :func:`rng_state`).

    Each rank continues its own random stream (dropout), so a resumed run repeats the
    uninterrupted one when the world size is unchanged; otherwise nothing is restored.
    """
    if not states or len(states) != world_size:
        return
    state = states[rank]
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
