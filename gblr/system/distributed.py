"""Data-parallel training under torchrun: one process per device, gradients averaged.

Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op for one process, so the
rest of the code reads the same either way. Under torchrun, each rank trains on its slice of every
global batch, evaluation sums (correct predictions, token NLL) are added across ranks, and only
rank 0 writes files.
"""
import os

import torch
import torch.distributed as dist

from gblr.system.errors import BadInput


def _from_submitit() -> None:
    """Inside a multi-task submitit (Slurm) job, export the variables torchrun would have set
    (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) with submitit's own helper."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()  # MASTER_PORT: kept when set, else derived from the job id
    if env.world_size > 1:
        # Every task keeps seeing all of the node's GPUs and picks cuda:LOCAL_RANK (``setup``).
        env.export(set_cuda_visible_devices=False, overwrite=True)


def setup(device_name: str) -> torch.device:
    """Join the process group when launched by torchrun (or a multi-task submitit job); return
    this rank's device."""
    _from_submitit()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise BadInput("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        # cuda:LOCAL_RANK of the node's GPUs; where the scheduler shows each task only its own, cuda:0
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(*values: float) -> list[float]:
    """The sums over ranks of each value (float64), the values themselves in one process."""
    if not dist.is_initialized():
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_sum_(*tensors: torch.Tensor) -> None:
    """Replace each tensor by its sum over ranks, in place (one all-reduce each); nothing in one process."""
    if not dist.is_initialized():
        return
    for tensor in tensors:
        dist.all_reduce(tensor)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
