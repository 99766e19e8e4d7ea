"""Distributed helpers: torchrun (env://) initialisation, NCCL on GPU and gloo on CPU."""
import os

import torch
import torch.distributed as dist


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def get_rank():
    return dist.get_rank() if is_dist() else 0


def is_main_process():
    return get_rank() == 0


def init_distributed(device):
    """Join the torchrun process group if the environment asks for one.

    Returns the device this process uses (``cuda:LOCAL_RANK`` on GPU). Single-process runs
    (no ``WORLD_SIZE`` > 1 in the environment) are left untouched.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return torch.device(device)
    use_cuda = torch.device(device).type == "cuda"
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    dist.barrier()
    return torch.device(device)


def all_gather_object(obj):
    """List of ``obj`` from every process (a one-element list without a process group)."""
    if not is_dist():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_mean(tensor):
    """Mean of ``tensor`` over processes (returned unchanged without a process group)."""
    if not is_dist():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / get_world_size()


def reduce_dict(values):
    """Mean of each scalar tensor of ``values`` over processes, as a dict of floats."""
    names = sorted(values)
    if not names:
        return {}
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in names])
    stacked = all_reduce_mean(stacked)
    return dict(zip(names, stacked.tolist()))
