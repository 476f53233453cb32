"""What each rank really stores: the trainer's own sharding code on a meta model over a fake process group.

The model is built on the meta device (no memory), tensor parallelism is applied with
``apply_tensor_parallel`` and ZeRO-3 with FSDP2 ``fully_shard`` per block and root, exactly as
``parallel/apply.py`` does, over torch's "fake" process group (one process pretends to be rank 0 of up to
thousands; collectives do nothing). The local shard shapes of rank 0 give its parameter bytes, which the
planner's (``parallel/planner.py``) weights-per-rank must agree with.

A fake process group is process-wide state and can be initialised once at a time, so measurements run in a
fresh ``python -m gptforge.parallel.fake_mesh`` child (``measure_in_subprocess``); the caller never holds a
process group.

A pipeline stage is measured on rank 0 of its (dp, tp) plane: the full model is pruned to the stage with the
trainer's own ``prune_to_rank`` (parallel/pipeline.py), then sharded. FSDP2 does not compose with pipelines in
the trainer yet; ZeRO-3 over a stage is measured anyway, as the sharding the planner assumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(kw_only=True, frozen=True)
class Measurement:
    """One layout to measure: a model config (``GPTConfig.to_dict()``) and its parallel degrees."""

    model: dict
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero_stage: int = 0
    precision: str = "bf16"
    sequence_parallel: bool = True


def stage_ranks(pp: int) -> dict[str, int]:
    """Pipeline rank measured for each stage role: ``only`` (pp = 1), or ``first``, ``middle``, ``last``."""
    if pp == 1:
        return {"only": 0}
    return {"first": 0, "last": pp - 1} | ({"middle": 1} if pp > 2 else {})


def measure_local_bytes(request: Measurement) -> dict[str, int]:
    """Bytes of rank 0's local parameter shards per stage role (``only``; or ``first``, ``middle``, ``last``).

    Initialises a fake process group of dp x tp ranks and destroys it before returning, so it must run in a
    process that holds no other process group (use ``measure_in_subprocess`` from tests and tools)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ..model.config import GPTConfig
    from ..model.gpt import GPT
    from .dims import ParallelDims
    from .pipeline import prune_to_rank
    from .tensor_parallel import apply_tensor_parallel

    dtype = getattr(torch, DTYPES[request.precision])
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=request.dp * request.tp)
    try:
        mesh = init_device_mesh("cpu", (request.dp, request.tp), mesh_dim_names=("dp", "tp"))
        out = {}
        for stage, pp_rank in stage_ranks(request.pp).items():
            with torch.device("meta"):
                model = GPT(GPTConfig(**request.model)).to(dtype)
            if request.pp > 1:  # keep this stage's blocks and embeddings, exactly as the trainer does
                prune_to_rank(model, ParallelDims(tp=request.tp, dp=request.dp, pp=request.pp), pp_rank)
            if request.tp > 1:  # as parallel/apply.py: tensor parallel first, then FSDP2 over "dp"
                apply_tensor_parallel(model, mesh["tp"], sequence_parallel=request.sequence_parallel,
                                      loss_parallel=True)
            if request.zero_stage == 3:
                from torch.distributed.fsdp import fully_shard

                for block in model.blocks.values():
                    fully_shard(block, mesh=mesh["dp"])
                fully_shard(model, mesh=mesh["dp"])
            total = 0
            for param in model.parameters():
                local = param.to_local() if isinstance(param, DTensor) else param
                total += local.numel() * local.element_size()
            out[stage] = total
        return out
    finally:
        dist.destroy_process_group()


def measure_in_subprocess(requests: list[Measurement], timeout: float = 300.0) -> list[dict[str, int]]:
    """``measure_local_bytes`` for each request, in one fresh Python process (no process group here)."""
    payload = json.dumps([dataclasses.asdict(r) for r in requests])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "gptforge.parallel.fake_mesh"], input=payload,
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"fake process-group measurement failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def main() -> None:
    """Read a JSON list of ``Measurement`` fields on stdin, print a JSON list of per-stage bytes."""
    requests = [Measurement(**item) for item in json.load(sys.stdin)]
    print(json.dumps([measure_local_bytes(r) for r in requests]))


if __name__ == "__main__":
    main()
