"""The backend of a world, chosen from where its ranks are (controller/placement.py)."""

from __future__ import annotations

from controller.placement import Placement, world_backend


def test_cpu_ranks_use_gloo() -> None:
    assert world_backend([Placement("h", "cpu"), Placement("h", "cpu")])[0] == "gloo"


def test_one_rank_needs_no_communicator() -> None:
    assert world_backend([Placement("h", "cuda:0")])[0] == "local"


def test_ranks_on_distinct_gpus_use_nccl_on_one_host_or_several() -> None:
    assert world_backend([Placement("h", "cuda:0"), Placement("h", "cuda:1")])[0] == "nccl"
    assert world_backend([Placement("a", "cuda:0"), Placement("b", "cuda:0")])[0] == "nccl"


def test_ranks_sharing_a_gpu_use_gloo_staged_through_host_memory() -> None:
    backend, why = world_backend([Placement("h", "cuda:0"), Placement("h", "cuda:0")])
    assert backend == "gloo" and "share a GPU" in why
    # "cuda" is device 0.
    assert world_backend([Placement("h", "cuda"), Placement("h", "cuda:0")])[0] == "gloo"


def test_a_gpu_is_known_by_its_uuid_whatever_index_a_worker_calls_it() -> None:
    # Two workers started with different CUDA_VISIBLE_DEVICES both call their GPU cuda:0.
    distinct = [Placement("h", "cuda:0", "GPU-aaa"), Placement("h", "cuda:0", "GPU-bbb")]
    assert world_backend(distinct)[0] == "nccl"
    same = [Placement("h", "cuda:0", "GPU-aaa"), Placement("h", "cuda:1", "GPU-aaa")]
    assert world_backend(same)[0] == "gloo"


def test_a_mix_of_cpu_and_gpu_ranks_uses_gloo() -> None:
    backend, why = world_backend([Placement("h", "cuda:0"), Placement("h", "cpu")])
    assert backend == "gloo" and "mixed" in why
