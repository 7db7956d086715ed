"""Which communication backend a world uses, from where its ranks are.

NCCL moves tensors between GPUs directly, but one communicator cannot have two ranks on the
same GPU ("Duplicate GPU detected"), and it has no CPU ranks. Gloo works anywhere, and a gloo
world on GPUs stages its tensors through host memory (worker.comm). So:

* every rank on a CUDA device of its own (distinct GPUs, on one host or several): ``nccl``;
* any two ranks on the same GPU (several workers per GPU, normal for models smaller than a
  GPU), or a mix of CPU and GPU ranks: ``gloo``, staged through host memory;
* all ranks on CPUs: ``gloo``.

A GPU is named by its UUID when the worker reports one (the same GPU under any
CUDA_VISIBLE_DEVICES), else by host and device index.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one rank runs."""

    host: str
    device: str  # "cpu", "cuda", "cuda:N"
    device_uuid: str = ""

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def gpu(self) -> str:
        """A name for the GPU that is the same for every worker on it."""
        if self.device_uuid:
            return self.device_uuid
        index = self.device.partition(":")[2] or "0"
        return f"{self.host}/cuda:{index}"


def world_backend(ranks: list[Placement]) -> tuple[str, str]:
    """The backend for a world of these ranks, and why (for status and the log)."""
    if len(ranks) <= 1:
        return "local", "one rank: no communicator"
    cuda = [p for p in ranks if p.is_cuda]
    if not cuda:
        return "gloo", "CPU ranks"
    if len(cuda) < len(ranks):
        return "gloo", "CPU and GPU ranks mixed: tensors staged through host memory"
    gpus = [p.gpu for p in cuda]
    if len(set(gpus)) < len(gpus):
        return "gloo", "ranks share a GPU: tensors staged through host memory"
    return "nccl", "every rank on a GPU of its own"
