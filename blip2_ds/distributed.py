"""Collectives with the autograd semantics the objectives need.

Every helper works unchanged in a single process (world size 1, no process group), so the
same model code runs on a laptop, under torchrun, DeepSpeed or SLURM.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def local_device() -> torch.device:
    """This process's device (made current): the CPU without CUDA; else ``cuda:LOCAL_RANK`` when the
    process sees all of its node's GPUs, or ``cuda:0`` when it sees exactly one (SLURM's
    ``--gpus-per-task=1`` / ``--gpu-bind`` give each task its own CUDA_VISIBLE_DEVICES)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank, visible = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if visible == 1:
        local_rank = 0
    elif local_rank >= visible:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but this process sees {visible} GPUs "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most one task per GPU, "
            f"and give each task either all of its node's GPUs or exactly one.")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (equal shapes); no gradient."""
    if not is_distributed():
        return tensor
    tensor = tensor.contiguous()
    out = tensor.new_empty((world_size() * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for the local slice.

    Each rank's loss depends on every rank's features (as columns of its similarity matrix);
    summing the column gradients back to the owner, followed by the usual data-parallel
    gradient average, gives exactly the gradient of the loss over the global batch.
    (Gathering without grad, as the original BLIP-2 does, drops those column terms.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.local_rows = tensor.shape[0]
        return all_gather_no_grad(tensor)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad_output.contiguous()
        rows = ctx.local_rows
        if dist.get_backend() == dist.Backend.NCCL:
            out = grad.new_empty((rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out
        # gloo has no reduce_scatter: all-reduce and keep the local slice.
        dist.all_reduce(grad)
        start = rank() * rows
        return grad[start:start + rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, differentiable (see _AllGatherWithGrad)."""
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor)


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor; no gradient)."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out


@torch.no_grad()
def fetch_rows(local: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Rows ``wanted`` of the concatenation of every rank's ``local`` (equal row counts), no gradient.

    Equal to ``all_gather_no_grad(local)[wanted]`` but moves only the requested rows: the ranks
    exchange their (small) index lists, then one ``all_to_all_single`` sends each rank exactly the
    rows it asked for. For the ITM negatives (each rank wants B of the B x W frozen image features,
    257 x 1408 bf16 each) that is B rows received per rank instead of B x W: at B=105 on 16 GPUs,
    76 MB instead of 1.2 GB. Every rank must ask for the same number of rows.
    """
    if not is_distributed():
        return local[wanted]
    rows, world, me = local.shape[0], world_size(), rank()
    wanted = wanted.to(local.device)
    requests = all_gather_no_grad(wanted).view(world, -1)  # (W, n): what every rank asked for
    owners = requests // rows
    # What I send: for each asking rank, my rows it asked for, in the order it asked.
    mine = owners == me
    send = local[(requests - me * rows)[mine]]  # row-major over (asking rank, its request order)
    send_counts = mine.sum(dim=1)
    my_owners = owners[me]
    receive_counts = torch.stack([(my_owners == r).sum() for r in range(world)])
    counts = torch.stack([send_counts, receive_counts]).tolist()  # one host sync for both split lists
    received = local.new_empty((wanted.shape[0], *local.shape[1:]))
    dist.all_to_all_single(received, send.contiguous(), counts[1], counts[0])
    # received is grouped by owner rank, each group in my request order: put rows back in place.
    order = torch.sort(my_owners, stable=True).indices
    out = torch.empty_like(received)
    out[order] = received
    return out
