"""What each rank really stores: the trainer's own sharding code on a meta model over a fake process group.

The model is built on the meta device (no memory), tensor parallelism is applied with
``apply_tensor_parallel`` and ZeRO-3 with FSDP2 ``fully_shard`` per block and root, exactly as
``parallel/apply.py`` does, over torch's "fake" process group (one process pretends to be rank 0 of up to
thousands; collectives do nothing). The local shard shapes of rank 0 give its parameter bytes, which the
planner's (``parallel/planner.py``) weights-per-rank must agree with.

A fake process group is process-wide state and can be initialised once at a time, so measurements run in a
fresh ``python -m gptforge.parallel.fake_mesh`` child (``measure_in_subprocess``); the caller never holds a
process group.

Pipeline stages are measured as a GPT of n_layer / pp blocks, keeping the modules the planner assigns to the
stage (first: token + position embeddings and blocks; middle: blocks; last: blocks, final LayerNorm and the
tied token embedding's copy), sharded with the same tensor-parallel and FSDP2 code.
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


def _stage_configs(model: dict, pp: int) -> dict[str, tuple[dict, tuple[str, ...]]]:
    """Per stage role: the config to build and the parameter-name prefixes the stage does not hold."""
    if pp == 1:
        return {"only": (model, ())}
    if model["n_layer"] % pp:
        raise ValueError(f"pp ({pp}) must divide n_layer ({model['n_layer']})")
    layers = model["n_layer"] // pp
    stages = {
        "first": (model | {"n_layer": layers, "final_norm": False}, ()),
        "last": (model | {"n_layer": layers}, ("pos_embeddings.",)),
    }
    if pp > 2:
        stages["middle"] = (model | {"n_layer": layers, "final_norm": False},
                            ("tok_embeddings.", "pos_embeddings."))
    return stages


def measure_local_bytes(request: Measurement) -> dict[str, int]:
    """Bytes of rank 0's local parameter shards per stage role (``only``; or ``first``, ``middle``, ``last``).

    Initialises a fake process group of dp x tp ranks and destroys it before returning, so it must run in a
    process that holds no other process group (use ``measure_in_subprocess`` from tests and tools)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from gptforge.model.config import GPTConfig
    from gptforge.model.gpt import GPT
    from gptforge.parallel.tensor_parallel import apply_tensor_parallel

    dtype = getattr(torch, DTYPES[request.precision])
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=request.dp * request.tp)
    try:
        mesh = init_device_mesh("cpu", (request.dp, request.tp), mesh_dim_names=("dp", "tp"))
        out = {}
        for stage, (model_kwargs, skipped) in _stage_configs(request.model, request.pp).items():
            with torch.device("meta"):
                model = GPT(GPTConfig(**model_kwargs)).to(dtype)
            if request.tp > 1:  # as parallel/apply.py: tensor parallel first, then FSDP2 over "dp"
                apply_tensor_parallel(model, mesh["tp"], sequence_parallel=request.sequence_parallel,
                                      loss_parallel=True)
            if request.zero_stage == 3:
                from torch.distributed.fsdp import fully_shard

                for block in model.blocks.values():
                    fully_shard(block, mesh=mesh["dp"])
                fully_shard(model, mesh=mesh["dp"])
            total = 0
            for name, param in model.named_parameters():
                if name.startswith(skipped):
                    continue
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
