"""The seam around diffusers' device pick (engine/parallel/seam.py): needed while diffusers divides by the number of
accelerators, which is 0 on a CPU machine. This test fails once diffusers no longer does: then remove the seam."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig

from engine.parallel.seam import enable_context_parallel
from engine.pipeline.tiny import build_tiny_pipeline
from engine.storage.images import Mode


@pytest.fixture
def one_rank_group(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_diffusers_still_divides_by_the_accelerator_count_so_the_seam_is_needed(one_rank_group):
    assert torch.accelerator.device_count() == 0  # this machine has no accelerator, as CI's
    transformer = build_tiny_pipeline(Mode.T2V).transformer
    with pytest.raises(ZeroDivisionError):  # fails once diffusers is fixed: the seam can go then
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    # Through the seam the device pick passes; a group of one rank then has no room for two (the two-rank run in
    # test_parallel.py goes all the way).
    with pytest.raises(Exception) as beyond:
        enable_context_parallel(build_tiny_pipeline(Mode.T2V).transformer, 2)
    assert not isinstance(beyond.value, ZeroDivisionError)
    assert torch.accelerator.device_count() == 0  # put back as it was
