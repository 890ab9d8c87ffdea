"""Where and how tensors run: device, mixed precision, the process group, determinism and data
loaders, one policy shared by extraction, fine-tuning and inference.

Precision has one vocabulary everywhere (``transfer.params.PRECISIONS``, for
``backbone.precision`` and ``finetune.precision``): ``auto``, ``float32``, ``bfloat16`` or
``float16``; ``auto`` is ``float32`` on CPU and mixed precision on a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from transfer.errors import PipelineError

log = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

# cuBLAS needs a fixed workspace to give the same result on every run (CUDA >= 10.2); it reads
# this variable when CUDA starts in the process.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


@dataclass(frozen=True)
class Runtime:
    """A device, the precision its forward passes run in, and this process's place in a
    ``torchrun`` process group (rank 0 of 1 without one)."""

    device: torch.device
    precision: str  # float32, bfloat16 or float16: never auto
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def mean_over_processes(self, value: float) -> float:
        """The mean of ``value`` over the processes of the group (``value`` itself in one)."""
        if self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total) / self.world_size

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision])

    def loader(self, dataset: torch.utils.data.Dataset, batch_size: int, *,
               sampler: torch.utils.data.Sampler | None = None,
               generator: torch.Generator | None = None, drop_last: bool = False,
               collate: Callable[[list[Any]], Any] | None = None,
               ) -> torch.utils.data.DataLoader:
        """A DataLoader in dataset order unless ``sampler`` says otherwise, batches made by
        ``collate`` (PyTorch's default collation unless given). On a GPU, worker processes
        decode while it computes; on CPU the forward pass already uses every core, and loader
        processes would only compete with it."""
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
            num_workers=min(8, os.cpu_count() or 1) if self.is_cuda else 0,
            collate_fn=collate, generator=generator, pin_memory=self.is_cuda,
            drop_last=drop_last)


def resolve_runtime(device: str = "auto", precision: str = "auto", *,
                    key: str = "precision", training: bool = False,
                    distributed: bool = False) -> Runtime:
    """Turn a device and a precision setting into a runtime.

    ``auto`` device: CUDA when PyTorch sees one. ``auto`` precision: float32 on CPU; on a GPU,
    float16 for inference and bfloat16 (float16 where the GPU lacks it) for training, whose
    gradients need bfloat16's range. ``distributed``: join ``torchrun``'s process group when
    there is one. ``key`` names the parameter in error messages.
    """
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise PipelineError(f"{key.rpartition('.')[0] or 'runtime'}.device: cuda, but PyTorch "
                            "sees no CUDA device (torch.cuda.is_available() is False); use "
                            "auto or cpu")
    use_cuda = device == "cuda" or (device == "auto" and has_cuda)
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0
    chosen = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if precision == "auto":
        if not use_cuda:
            precision = "float32"
        elif training and torch.cuda.is_bf16_supported():
            precision = "bfloat16"
        else:
            precision = "float16"
    if precision == "float16" and not use_cuda:
        raise PipelineError(f"{key}: float16 mixed precision needs a CUDA device; on CPU use "
                            "float32 or bfloat16")
    rank = 0
    if world_size > 1:
        if use_cuda:
            torch.cuda.set_device(chosen)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        rank = dist.get_rank()
    return Runtime(chosen, precision, rank, world_size)


def inference_runtime(recorded_precision: str) -> Runtime:
    """The runtime for new images through a model extracted or trained in
    ``recorded_precision``: the best device here, in that precision where it can run there
    (float16 on CPU runs in float32)."""
    runtime = resolve_runtime("auto", "auto")
    if recorded_precision == "float16" and not runtime.is_cuda:
        return runtime
    return Runtime(runtime.device, recorded_precision)


def set_determinism(enabled: bool) -> None:
    """Trade GPU speed for bit-identical results; call it before anything touches CUDA.

    ``True``: only deterministic algorithms (an op without one raises), cuDNN without
    autotuning and with deterministic convolutions, a fixed cuBLAS workspace. ``False``:
    PyTorch's defaults. CPU results are the same run to run either way.
    """
    if enabled:
        if torch.cuda.is_initialized() and \
                os.environ.get("CUBLAS_WORKSPACE_CONFIG") != CUBLAS_WORKSPACE_CONFIG:
            log.warning("CUDA was started before set_determinism(True): cuBLAS may still be "
                        "non-deterministic")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = enabled


def end_process_group(runtime: Runtime) -> None:
    """Wait for every process, then leave the group (nothing to do in a single process)."""
    if runtime.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
