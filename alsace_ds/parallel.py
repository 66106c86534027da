"""The one module that touches ``torch.distributed``: process-group set-up and collectives.

Everything else in the package is pure; it receives a ``ParallelContext`` or a ``reducer(ctx)``
callable. Start-up goes through ``deepspeed.init_distributed`` so the same code runs under the
``deepspeed`` launcher, ``torchrun``, ``mpirun`` (``auto_mpi_discovery=True`` fills RANK etc.
from MPI) and a plain single ``python`` process. The backend is DeepSpeed's accelerator's
(nccl on CUDA, gloo under ``DS_ACCELERATOR=cpu``).

Every collective runs on the default process group, whose timeout is set at init: a dead or
diverged rank makes the others fail after ``timeout_s`` instead of hanging forever. (The
explicit timeout wins over DeepSpeed's ``DEEPSPEED_TIMEOUT`` default.)

CPU note: DeepSpeed's CPU accelerator JIT-compiles its ``deepspeed_shm_comm`` op on the first
init of a machine (~25-40 s, cached in TORCH_EXTENSIONS_DIR). When the ``deepspeed`` launcher
sets LOCAL_SIZE, that op leaves ``/dev/shm/deepspeed_allreduce_buffer_*`` files behind.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class LaunchError(RuntimeError):
    """The processes were started in a way that cannot work (wrong device, CPU with GPUs)."""


#: Environment variables that show the process was started by an MPI launcher.
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in the job; read once at start-up and passed around."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = 600.0
    # View parallelism: ranks form groups of ``view_size`` consecutive ranks that work on the
    # same examples and split their language views; data parallelism runs across groups.
    view_size: int = 1
    view_group: Any = None  # the torch process group of this rank's view group (None: alone)

    @property
    def view_rank(self) -> int:
        """This rank's position inside its view group (which views it holds)."""
        return self.rank % self.view_size

    @property
    def dp_rank(self) -> int:
        """Index of this rank's view group = its data-parallel rank."""
        return self.rank // self.view_size

    @property
    def dp_world(self) -> int:
        """Number of view groups = data-parallel world size."""
        return self.world_size // self.view_size

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the rank that logs and writes files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when collectives must actually talk to other processes."""
        return self.world_size > 1

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> ParallelContext:
        """A one-process context with no process group (collectives are local no-ops)."""
        return cls(device=torch.device(device))


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous that must not collide with another
    job's, e.g. the launchers' default 29500). The one definition in this project."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _default_single_process_env() -> None:
    """Let a plain ``python script.py`` run as a world of one.

    Without launcher variables DeepSpeed would try MPI discovery (mpi4py, ``hostname -I``,
    fixed port 29500); a free local port avoids both the dependency and port clashes.
    """
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    if any(name in os.environ for name in _MPI_ENV):
        return  # let DeepSpeed's MPI discovery fill the variables
    os.environ.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())),
    )


def _mpi_discovery_keeping_master_addr(port: int) -> None:
    """Under an MPI launcher, DeepSpeed's discovery fills RANK/WORLD_SIZE/LOCAL_RANK from MPI
    but also replaces MASTER_ADDR by the first address of rank 0's ``hostname -I``, which on a
    multi-homed node (Infiniband + Ethernet + docker bridges) may be unreachable from the
    other nodes. Run that discovery here and keep an exported MASTER_ADDR (slurm/common.sh
    exports the allocation's first host)."""
    required = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
    if not any(name in os.environ for name in _MPI_ENV) or all(n in os.environ for n in required):
        return
    from deepspeed.comm.comm import mpi_discovery

    exported = os.environ.get("MASTER_ADDR")
    mpi_discovery(distributed_port=port, verbose=False)
    if exported:
        os.environ["MASTER_ADDR"] = exported


#: Variables through which Slurm hands GPUs to a job, and the values that mean "none".
#: (Not CUDA_VISIBLE_DEVICES: the deepspeed launcher sets it to 0..N-1 even on the CPU.)
SLURM_GPU_ENV = {
    "SLURM_STEP_GPUS": ("", "NoDevFiles", "none"),
    "SLURM_JOB_GPUS": ("", "NoDevFiles", "none"),
    "SLURM_GPUS_ON_NODE": ("", "0"),
}


def gpus_given(env: Mapping[str, str], dev: Path = Path("/dev")) -> str | None:
    """What shows that this process was given GPUs (a Slurm GPU variable, or NVIDIA device
    files not hidden by ``CUDA_VISIBLE_DEVICES=-1``/empty), or None."""
    for name, none in SLURM_GPU_ENV.items():
        value = env.get(name, "").strip()
        if value not in none:
            return f"{name}={value}"
    devices = sorted(dev.glob("nvidia[0-9]*"))
    hidden = env.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1")
    if devices and not hidden:
        return f"{len(devices)} NVIDIA device(s) in {dev}"
    return None


def check_not_cpu_with_gpus(accelerator: str, env: Mapping[str, str]) -> None:
    """A job that was given GPUs must not train on the CPU (an inherited DS_ACCELERATOR=cpu,
    a CPU build of torch): it would run ~100x slower and look fine. ALSACE_ALLOW_CPU=1 (set by
    slurm/common.sh for ALSACE_CPU=1 jobs) says the CPU is meant."""
    given = gpus_given(env)
    if accelerator != "cpu" or given is None or env.get("ALSACE_ALLOW_CPU") == "1":
        return
    why = (
        f"DS_ACCELERATOR={env['DS_ACCELERATOR']} is set"
        if env.get("DS_ACCELERATOR") == "cpu"
        else "torch sees no CUDA device (a CPU build of torch, or no driver)"
    )
    raise LaunchError(
        f"this process was given GPUs ({given}) but DeepSpeed's accelerator is the CPU ({why}); "
        "refusing to train on the CPU. Unset DS_ACCELERATOR / install a CUDA build of torch, or "
        "set ALSACE_ALLOW_CPU=1 to run on the CPU anyway"
    )


def device_index(local_rank: int, visible: int) -> int:
    """The CUDA device of this rank among the ``visible`` ones: its local rank when the
    process sees every GPU of the node (torchrun, deepspeed), 0 when it sees exactly one
    (``srun --gpus-per-task=1`` or a per-rank CUDA_VISIBLE_DEVICES, where LOCAL_RANK would
    name a device that does not exist)."""
    if visible < 1:
        raise LaunchError("no CUDA device is visible to this process")
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise LaunchError(
        f"LOCAL_RANK {local_rank} but this process sees only {visible} CUDA devices: start one "
        "rank per visible GPU, or give each rank one GPU (--gpus-per-task=1)"
    )


def init_distributed(timeout_s: float = 600.0, view_size: int = 1) -> ParallelContext:
    """Initialise the default process group through DeepSpeed and describe this process,
    with its view groups (``view_size`` consecutive ranks each) built here, once: the
    context never changes afterwards.

    A second call with ``view_size`` 1 returns an equal context without re-initialising. On
    CUDA the current device is set to ``cuda:<local_rank>``; elsewhere the device is the CPU.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _default_single_process_env()
    accelerator = get_accelerator()
    check_not_cpu_with_gpus(accelerator.device_name(), os.environ)
    # MPI discovery sets MASTER_PORT to this port (default 29500), overriding the environment:
    # honour an exported MASTER_PORT (slurm/common.sh derives one per job), or two MPI jobs on
    # a node collide on 29500.
    port = int(os.environ.get("MASTER_PORT", "29500"))
    _mpi_discovery_keeping_master_addr(port)
    deepspeed.init_distributed(
        dist_backend=accelerator.communication_backend_name(),
        timeout=timedelta(seconds=timeout_s),
        auto_mpi_discovery=True,
        distributed_port=port,
    )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator.device_name() == "cuda":
        index = device_index(local_rank, torch.cuda.device_count())
        accelerator.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    ctx = ParallelContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        timeout_s=timeout_s,
    )
    return _with_view_groups(ctx, view_size)


def shutdown() -> None:
    """Destroy the default process group (if any) so the process can exit cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active(ctx: ParallelContext) -> bool:
    return ctx.distributed and dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: Tensor, ctx: ParallelContext) -> Tensor:
    """Sum ``t`` over all ranks; returns a NEW tensor on ``t``'s device (input untouched).

    The collective runs on ``ctx.device`` (NCCL needs CUDA tensors); world size 1 is a copy.
    """
    if not _active(ctx):
        return t.clone()
    buf = t.detach().to(ctx.device, copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def reducer(ctx: ParallelContext) -> Callable[[Tensor], Tensor]:
    """``reduce`` callable for the pure modules (e.g. ``select_from_views``)."""

    def reduce(t: Tensor) -> Tensor:
        return all_reduce_sum(t, ctx)

    return reduce


def barrier(ctx: ParallelContext) -> None:
    """Wait for every rank (fails after ``ctx.timeout_s`` if one never arrives)."""
    if _active(ctx):
        dist.barrier(timeout=timedelta(seconds=ctx.timeout_s))


def broadcast_object(obj: Any, ctx: ParallelContext, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (others' ``obj`` is ignored)."""
    if not _active(ctx):
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=ctx.device)
    return box[0]


class PeerError(RuntimeError):
    """Raised on the other ranks when rank 0's part of a :func:`decide` failed (rank 0
    raises the original error and is the one that reports it)."""


def decide(read: Callable[[], Any], ctx: ParallelContext) -> Any:
    """``read()`` run on rank 0 only, its (picklable) result handed to every rank.

    For decisions taken from files (skip a finished stage, which model is best, which
    checkpoint tag is committed): on a shared filesystem ranks can see different states
    (caches, a write in flight), and ranks that decide differently run different collectives
    and hang. One reader, one answer. When ``read()`` raises, rank 0 re-raises it and every
    other rank raises :class:`PeerError`, so no rank is left waiting."""
    failed: BaseException | None = None
    value = None
    if ctx.rank == 0:
        try:
            value = read()
        except Exception as exc:  # noqa: BLE001 - handed on below, on every rank
            failed = exc
    box = broadcast_object((failed is not None, None if failed else value), ctx)
    if failed is not None:
        raise failed
    if box[0]:
        raise PeerError("rank 0 failed while deciding (it reports the reason)")
    return box[1]


def all_max(values: list[int], ctx: ParallelContext) -> list[int]:
    """Element-wise max of small non-negative ints over all ranks (one small all-reduce,
    read on the host): a value only rank 0 sets (the others give 0) becomes every rank's."""
    if not _active(ctx):
        return list(values)
    buf = torch.tensor(values, dtype=torch.int64, device=ctx.device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return [int(x) for x in buf.tolist()]


def any_rank(flags: list[bool], ctx: ParallelContext) -> list[bool]:
    """Element-wise OR of ``flags`` over all ranks (one small all-reduce): a stop request
    seen by any rank, or a decision only rank 0 takes (its clock), becomes every rank's."""
    return [bool(x) for x in all_max([int(f) for f in flags], ctx)]


def all_gather_object(obj: Any, ctx: ParallelContext) -> list[Any]:
    """Every rank's picklable ``obj``, indexed by rank."""
    if not _active(ctx):
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_gather_partitions(part: Tensor, numel: int, ctx: ParallelContext) -> Tensor:
    """Concatenate every rank's equal-size flat ``part`` (a ZeRO-3 partition) in rank order
    and keep the first ``numel`` elements (the rest is the partitions' padding)."""
    if not _active(ctx):
        return part.reshape(-1)[:numel].clone()
    local = part.detach().reshape(-1).to(ctx.device)
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local)
    return torch.cat(parts)[:numel]


def assemble_rows(
    idx: Tensor, rows: Tensor, num_rows: int, ctx: ParallelContext, dtype: torch.dtype
) -> Tensor:
    """The whole ``[num_rows, C]`` tensor on every rank from each rank's rows ``rows``
    ``[R, C]`` at indices ``idx`` ``[R]``: each row is held by exactly one rank (inference
    deals views out), so the sum of the ranks' zero-filled buffers is the whole."""
    dense = torch.zeros(num_rows, rows.shape[-1], dtype=dtype)
    dense[idx] = rows.to(dtype).cpu()
    return all_reduce_sum(dense, ctx)


def _with_view_groups(ctx: ParallelContext, view_size: int) -> ParallelContext:
    """Split the world into groups of ``view_size`` consecutive ranks.

    Every rank creates every group, in the same order (``new_group`` is collective).
    """
    if view_size < 1 or ctx.world_size % view_size:
        raise ValueError(
            f"view_parallel_size {view_size} must divide the world size {ctx.world_size}"
        )
    if view_size == 1:
        return replace(ctx, view_size=1, view_group=None)
    mine = None
    for start in range(0, ctx.world_size, view_size):
        group = dist.new_group(
            list(range(start, start + view_size)), timeout=timedelta(seconds=ctx.timeout_s)
        )
        if start <= ctx.rank < start + view_size:
            mine = group
    return replace(ctx, view_size=view_size, view_group=mine)


class _GatherViews(torch.autograd.Function):
    """All-gather along dim 1 whose backward sums every member's gradient of each slot into
    its owner (a reduce-scatter, done as all-reduce + slice: the tensors are [B, T, C], tiny).

    Not ``torch.distributed.nn.functional.all_gather``: on gloo its backward scatters with the
    GROUP rank as the source where torch expects a GLOBAL rank, so every view group but the
    first fails ("Global rank 0 is not part of group"; seen with 2 view groups of 2)."""

    @staticmethod
    def forward(ctx, local: Tensor, group: Any) -> Tensor:  # noqa: ANN001 - autograd API
        ctx.group, ctx.width = group, local.shape[1]
        ctx.member = dist.get_rank(group=group)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001 - autograd API
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        lo = ctx.member * ctx.width
        return total[:, lo : lo + ctx.width], None


def gather_views(local: Tensor, ctx: ParallelContext) -> Tensor:
    """Differentiable all-gather of the view group's label distributions.

    ``local`` ``[B, T_local, C]`` -> ``[B, view_size * T_local, C]`` in member order, so slot
    ``j`` is member ``j // T_local``'s ``j % T_local``-th view. Backward sums the gradients
    of every member's copy into the owner's shard (reduce-scatter), so each view's gradient
    reaches the rank that ran its forward.
    """
    if ctx.view_size == 1:
        return local
    return _GatherViews.apply(local, ctx.view_group)
