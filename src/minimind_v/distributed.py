"""Process layout for training: one process, or `torchrun` with NCCL on CUDA and gloo on CPU; and what the CPU
offers for bf16, which decides the CPU training precision.

Small control messages (stop requests, row and token counters, RNG states) always travel over a gloo group on
the CPU, so they never force the GPU to synchronise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Processes:
    rank: int
    world_size: int
    device: torch.device
    control: object | None = None  # gloo process group for CPU tensors (None: the default group is gloo)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes of a short list of numbers (CPU, float64)."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, group=self.control)
        return tensor.tolist()

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order."""
        if not self.active:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.control)
        return gathered

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.control)


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def setup(device: str) -> Processes:
    """Join the process group when launched by torchrun (RANK set); pick the device of this process."""
    if "RANK" not in os.environ:
        return Processes(0, 1, torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ["WORLD_SIZE"])
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    control = dist.new_group(backend="gloo") if cuda else None
    placed = torch.device("cuda", local_rank) if cuda else torch.device(device)
    return Processes(rank, world_size, placed, control)


def teardown(processes: Processes) -> None:
    if processes.active:
        processes.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, processes: Processes) -> torch.Tensor:
    """In-place sum over processes on the tensor's own device (no host sync)."""
    if processes.active:
        dist.all_reduce(tensor)
    return tensor


CPU_DTYPES = ("auto", "float32", "bfloat16")


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), so `--cpu_dtype bfloat16` pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_feature() -> str | None:
    """What gives this CPU native bf16 matrix products: "AMX", "AVX512-BF16" (or "oneDNN bf16" where the CPU
    flags do not say, on another architecture); None when it has none."""
    if not native_cpu_bf16():
        return None
    flags = cpu_flags()
    return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "oneDNN bf16"


def cpu_flags() -> set[str]:
    """The instruction-set flags of /proc/cpuinfo (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def resolve_cpu_dtype(requested: str) -> str:
    """`--cpu_dtype` -> the CPU training precision: `auto` is bfloat16 (autocast of the matrix products) on a CPU
    with native bf16, else float32; float32 and bfloat16 are kept."""
    if requested not in CPU_DTYPES:
        raise ValueError(f"--cpu_dtype must be one of {', '.join(CPU_DTYPES)} (got {requested!r})")
    if requested == "auto":
        return "bfloat16" if cpu_bf16_feature() else "float32"
    return requested
