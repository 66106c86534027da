"""Which rank works on which examples / views. Pure index arithmetic, no collectives.

Every function here gives every rank the SAME number of batches: under ZeRO-3 each
forward gathers parameters collectively, so a rank that ran one forward fewer would
deadlock the others. Uneven tails are padded (training: by wrapping around, like
``DistributedSampler``; inference: with masked dummy views that are never counted).
"""

from __future__ import annotations

import math

import torch


def epoch_order(n: int, seed: int | None) -> list[int]:
    """The global order of ``n`` examples for one epoch (identical on every rank)."""
    if seed is None:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen).tolist()


def train_batches(
    n: int, micro_batch: int, rank: int, world: int, seed: int | None, grad_accum: int = 1
) -> list[list[int]]:
    """This rank's micro-batches (example indices) for one epoch.

    Optimizer step s covers positions ``[s*G, (s+1)*G)`` of the epoch order, with
    ``G = micro * world * grad_accum`` (the order is wrapped around to fill the last step);
    its micro-step j gives rank r the ``micro`` positions at ``s*G + (j*world + r)*micro``.
    So an epoch is ``ceil(n / G)`` optimizer steps, and which examples a step trains on
    depends only on ``G``, not on how it is split into ranks and micro-steps: the same preset
    runs the same steps on 1 GPU or 32.
    """
    if n <= 0:
        raise ValueError("no examples to train on")
    order = epoch_order(n, seed)
    per_micro = micro_batch * world
    per_step = per_micro * grad_accum
    steps = math.ceil(n / per_step)
    padded = [order[i % n] for i in range(steps * per_step)]
    starts = (m * per_micro + rank * micro_batch for m in range(steps * grad_accum))
    return [padded[a : a + micro_batch] for a in starts]


def view_batches(
    num_items: int, batch_size: int, rank: int, world: int, lengths: list[int] | None = None
) -> list[tuple[list[int], list[bool]]]:
    """This rank's inference batches over ``num_items`` items (views): (indices, valid).

    Rank r holds items r, r + world, ...; every rank gets ``ceil(num_items / world)`` slots,
    the missing ones filled with a dummy (a copy of item 0, ``valid=False``). With ``lengths``
    the rank's items are sorted longest first so that each batch pads little.
    """
    if num_items <= 0:
        raise ValueError("no items to run inference on")
    mine = list(range(rank, num_items, world))
    if lengths is not None:
        mine.sort(key=lambda i: -lengths[i])
    slots = math.ceil(num_items / world)
    valid = [True] * len(mine) + [False] * (slots - len(mine))
    mine = mine + [0] * (slots - len(mine))
    return [
        (mine[i : i + batch_size], valid[i : i + batch_size]) for i in range(0, slots, batch_size)
    ]
