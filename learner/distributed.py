"""Data parallelism for a learner group: the torch.distributed side, no Ray.

A group of N learners trains as one learner would on the same global minibatch: every rank
draws the same minibatch permutation and timestep permutation (the same generator, seeded alike),
takes its contiguous share of each minibatch (`shard`), and before every optimizer step the
ranks' gradients are summed (`all_reduce_grads`). Each rank scales its loss by its share of the
minibatch, so the sum is the single learner's gradient; every rank then clips and steps the same
AdamW on the same gradient and keeps the same state.

The process group is set up as Ray Train sets up its torch one (`ray.train.torch.config`): rank
0 picks a free port on its node and says its address (`free_address`); every rank then calls
`init_process_group` with a `tcp://` rendezvous there (`join`): gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=30)
"""How long a collective waits for the other ranks (torch's default for gloo). The driver stops a
group whose rank was lost well before: it watches every rank's call (`learner.group`)."""


def free_address() -> str:
    """host:port for the rendezvous, on this node: its IP as Ray sees it (reachable from the
    other nodes), and a port that was free a moment ago (as Ray Train picks it)."""
    host = "127.0.0.1"
    try:
        import ray  # inside a Ray actor: the node's address in the cluster

        if ray.is_initialized():
            host = ray.util.get_node_ip_address()
    except ImportError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return f"{host}:{port}"


def backend(device: str) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.startswith("cuda") else "gloo"


def join(rank: int, world: int, address: str, device: str) -> None:
    """Join the group of `world` ranks whose rank 0 listens at `address` (host:port); returns
    once every rank has joined."""
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group")
    dist.init_process_group(
        backend(device),
        init_method=f"tcp://{address}",
        rank=rank,
        world_size=world,
        timeout=TIMEOUT,
    )


def broadcast_params(params: Sequence[torch.Tensor]) -> None:
    """Every rank takes rank 0's values of `params` (the same start, whatever each rank loaded)."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def all_reduce_grads(params: Sequence[torch.Tensor]) -> None:
    """Sum the gradients of `params` over the ranks, in place: one all-reduce per dtype over the
    gradients flattened into one buffer (hundreds of small LoRA tensors would each pay the
    latency of a collective). Every rank holds gradients for the same parameters (same code
    path); parameters without one are left without one, as a single learner leaves them."""
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, part in zip(same, flat.split([g.numel() for g in same]), strict=True):
            g.copy_(part.view_as(g))


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """The sums over the ranks of a few scalars (float64: every rank gets the same bits)."""
    flat = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat.tolist()


def shard(n: int, rank: int, world: int) -> slice:
    """The positions of rank's share of a minibatch of n samples: contiguous, sizes differing by
    at most one, together exactly 0..n-1."""
    return slice(n * rank // world, n * (rank + 1) // world)


def leave() -> None:
    """Leave the process group (before the actor ends or joins another)."""
    if dist.is_initialized():
        dist.destroy_process_group()
