"""DeepSpeed ZeRO on two gloo ranks keeps no whole model on a rank: a ZeRO-3 model is built as each
rank's partitions only, holding the one-process model's values, and under every stage a rank's
checkpoint state holds about 1/world of the weights and Adam moments, which read back exactly.

Everything compared here is copied, never computed differently, so the comparisons are bit-equality.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor

from gptforge.model import GPTConfig, build_model, lm_loss_sum
from gptforge.parallel import deepspeed_engine
from gptforge.parallel.dims import ParallelDims
from helpers.distributed import run_distributed

pytestmark = pytest.mark.dist

CPU = torch.device("cpu")
SEED = 5
WORLD = 2
# Odd widths: biases, LayerNorms and the position embeddings (33 x 27) have odd numbers of elements,
# so ZeRO-3 pads their last partition, and partitions start inside rows (27 x 27: rank 1 at row 13).
SHAPE = dict(n_layer=2, d_model=27, n_head=3, context_length=33, vocab_size=200)


def _deepspeed_rank(rank: int) -> None:
    os.environ["LOCAL_RANK"] = str(rank)  # zero.Init picks its device by it (torchrun sets it)


def _ds_config(stage: int, offload: bool = False) -> dict:
    dims = ParallelDims(dp=WORLD, zero_engine="deepspeed", zero_stage=stage, optimizer_offload=offload)
    return deepspeed_engine.deepspeed_config(dims=dims, d_model=SHAPE["d_model"], micro_batch=1, global_batch=WORLD,
                                             precision="fp32",
                                             grad_clip=1.0)


def _check_zero3_build(rank: int, world_size: int) -> None:
    _deepspeed_rank(rank)
    config = GPTConfig(**SHAPE)
    reference = build_model(config, CPU, SEED)  # one process, whole
    rng = torch.get_rng_state()
    model = deepspeed_engine.build_model(config, _ds_config(3), CPU, SEED)
    assert torch.equal(torch.get_rng_state(), rng), "building consumed the run's seeded RNG"
    held = 0
    for name, param in model.named_parameters():
        full = reference.get_parameter(name).detach().flatten()
        assert param.numel() == 0, name  # the module's own tensor is empty: only the partition exists
        assert tuple(param.ds_shape) == tuple(reference.get_parameter(name).shape), name
        part = param.ds_tensor
        assert part.numel() == math.ceil(full.numel() / world_size), name
        start = rank * part.numel()
        numel = max(0, min(part.numel(), full.numel() - start))
        assert torch.equal(part[:numel], full[start:start + numel]), name
        assert not part[numel:].any(), name  # padding
        held += part.numel()
    total = sum(p.numel() for p in reference.parameters())
    # ceil(n / world) exceeds n / world by less than one element per parameter.
    assert total / world_size <= held < total / world_size + len(list(reference.parameters()))


def test_zero3_build_holds_only_this_ranks_partitions_of_the_one_process_init():
    run_distributed(_check_zero3_build, WORLD)


def _engine(stage: int, offload: bool):
    config = GPTConfig(**SHAPE)
    ds_config = _ds_config(stage, offload)
    model = deepspeed_engine.build_model(config, ds_config, CPU, SEED)
    shapes = {p: deepspeed_engine.param_shape(p) for p in model.parameters()}
    # training/trainer.py's build_optimizer split: matrices and embeddings decay.
    groups = [{"params": [p for p in shapes if len(shapes[p]) >= 2], "weight_decay": 0.1},
              {"params": [p for p in shapes if len(shapes[p]) < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    return model, deepspeed_engine.build_engine(model, optimizer, ds_config)


def _train_step(engine, rank: int, step: int) -> None:
    tokens = torch.randint(0, SHAPE["vocab_size"], (1, 17), generator=torch.Generator().manual_seed(10 * step + rank))
    loss = lm_loss_sum(engine(tokens[:, :-1]), tokens[:, 1:]) / (WORLD * 16)
    engine.backward(loss)
    engine.step()


def _full_state(model) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 weights and Adam moments, gathered whole (collective; for comparing only)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    state = {}
    for name, param in model.named_parameters():
        state[f"model.{name}"] = safe_get_full_fp32_param(param).detach().cpu().clone()
        for key in deepspeed_engine.ADAM_MOMENTS:
            state[f"optim.state.{name}.{key}"] = safe_get_full_optimizer_state(param, key).detach().cpu().clone()
    return state


def _module_weights(model) -> dict[str, torch.Tensor]:
    """The module's own (bit16; here fp32) weights, gathered whole under ZeRO-3."""
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return {f"model.{name}": param.detach().clone() for name, param in model.named_parameters()}


def _check_sharded_checkpoint(rank: int, world_size: int, stage: int, offload: bool, checkpoint_dir: str) -> None:
    _deepspeed_rank(rank)
    model, engine = _engine(stage, offload)
    _train_step(engine, rank, 1)
    model_sd, optim_sd = deepspeed_engine.full_state_dicts(engine, model, step=1)

    # Each parameter's weights and moments: parameter-shaped ShardedTensors holding this rank's share.
    sharded = list(model_sd.values()) + [optim_sd[f"state.{name}.{key}"] for name in model_sd
                                         for key in deepspeed_engine.ADAM_MOMENTS]
    assert all(isinstance(t, ShardedTensor) for t in sharded)
    for name, param in model.named_parameters():
        assert model_sd[name].size() == deepspeed_engine.param_shape(param), name
    held = sum(shard.tensor.numel() for t in sharded for shard in t.local_shards())
    total = 3 * sum(math.prod(deepspeed_engine.param_shape(p)) for p in model.parameters())
    everyone = [None] * world_size
    dist.all_gather_object(everyone, held)
    assert sum(everyone) == total, everyone  # every element written exactly once
    # A share of 1/world: ZeRO-3 splits each parameter, ZeRO-1/2 each flat parameter group (padded to
    # a multiple of 2 x world), into world equal partitions, so a rank's elements of each of the three
    # states differ from 1/world by less than 2 x world per parameter (there are fewer groups).
    n_params = len(list(model.parameters()))
    assert abs(held - total / world_size) < 3 * n_params * 2 * world_size, (held, total)

    saved = _full_state(model)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir)
    # Read back whole: the pieces assemble to the engine's full state.
    whole = {"model": {n: torch.empty(deepspeed_engine.param_shape(p)) for n, p in model.named_parameters()},
             "optim": {f"state.{n}.{k}": torch.empty(deepspeed_engine.param_shape(p))
                       for n, p in model.named_parameters() for k in deepspeed_engine.ADAM_MOMENTS}}
    dcp.load(whole, checkpoint_id=checkpoint_dir)
    read = {f"model.{n}": t for n, t in whole["model"].items()} | {f"optim.{k}": t for k, t in whole["optim"].items()}
    assert read.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(read[key], value), key

    # Move on a step, then load the checkpoint back: the engine's state is the saved one again,
    # the module's weights included, and Adam's step count is 1.
    _train_step(engine, rank, 2)
    assert not torch.equal(_full_state(model)["model.tok_embeddings.weight"], saved["model.tok_embeddings.weight"])
    deepspeed_engine.load_full_state_dicts(engine, model, checkpoint_dir)
    restored = _full_state(model)
    for key, value in saved.items():
        assert torch.equal(restored[key], value), key
    for key, value in _module_weights(model).items():
        assert torch.equal(value, saved[key]), key
    steps = [state["step"] for state in engine.optimizer.optimizer.state.values() if "step" in state]
    assert steps and all(float(s) == 1.0 for s in steps), steps
    _train_step(engine, rank, 3)  # and the engine trains on from there


@pytest.mark.parametrize("stage, offload", [(1, False), (2, False), (2, True), (3, False), (3, True)],
                         ids=["zero1", "zero2", "zero2-offload", "zero3", "zero3-offload"])
def test_checkpoint_state_is_this_ranks_share_and_reads_back_exactly(stage, offload, tmp_path):
    run_distributed(_check_sharded_checkpoint, WORLD, stage, offload, str(tmp_path / "checkpoint"))


@pytest.mark.parametrize("shape, start, stop", [((4, 5), 3, 17), ((4, 5), 5, 15), ((4, 5), 6, 9),
                                                 ((2, 3, 4), 5, 20), ((7,), 2, 5), ((4, 5), 0, 20)])
def test_flat_ranges_become_boxes_that_tile_them(shape, start, stop):
    full = torch.arange(math.prod(shape)).view(shape)
    boxes = deepspeed_engine.flat_range_boxes(shape, start, stop)
    assert len(boxes) <= 2 * len(shape) - 1
    pieces = []
    for flat, offsets, sizes in boxes:
        box = full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].flatten()
        assert box[0] == flat and torch.equal(box, torch.arange(flat, flat + box.numel()))
        pieces.append(box)
    assert torch.equal(torch.cat(pieces), torch.arange(start, stop))
