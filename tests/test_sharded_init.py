"""Each rank initialises only its own shards (parallel/apply.py): under FSDP (uneven shards, with the
activation-checkpoint wrapper's names), tensor parallelism and FSDP over tensor parallelism, every local
shard equals the slice of the one-process initialisation that DTensor itself would cut
(``distribute_tensor(full, ...).to_local()``), and gathering the shards gives the one-process
parameter. Both sides draw the same values from the same (seed, name, row block) generators and copy
them, so the comparisons ask for bit-equality. And no rank allocates a full parameter it does not keep.

The row blocks are shrunk (``INIT_BLOCK_ELEMENTS``) so the tiny model's parameters span many blocks:
shards then start and end inside blocks, and a full-parameter temporary is far larger than one block.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import gptforge.model.gpt as gpt_module
from gptforge.model import GPT, build_model, get_preset
from gptforge.parallel.apply import clean_name, init_local_shard_, init_local_shards, parallelize
from gptforge.parallel.dims import ParallelDims
from helpers.distributed import run_distributed

pytestmark = pytest.mark.dist

CPU = torch.device("cpu")
SEED = 5
BLOCK_ELEMENTS = 128
"""Two rows of the tiny model's width (64) per row block."""
# Odd: the position embeddings' 37 rows split unevenly over two FSDP ranks (19 + 18, FSDP2 pads the second).
CONTEXT = 37


class LargestAllocation(TorchDispatchMode):
    """The largest storage (bytes) any tensor op produces while active: a new tensor's own, or for a
    view or an in-place op, the storage it lives in."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.untyped_storage().nbytes())
        return out


def block_bytes(shape: torch.Size) -> int:
    """Bytes of one fp32 row block of a parameter of ``shape`` (all of it when smaller)."""
    row = shape[1:].numel()
    return min(gpt_module.rows_per_block(shape), shape[0]) * row * 4


def _sharded_model(dims: ParallelDims) -> tuple[GPT, dict[str, torch.Tensor]]:
    gpt_module.INIT_BLOCK_ELEMENTS = BLOCK_ELEMENTS  # this rank's process only; the reference uses it too
    config = get_preset("tiny").config(context_length=CONTEXT)
    with torch.device("meta"):
        model = GPT(config)
    parallelize(model, dims, dims.build_mesh("cpu"), CPU, seed=SEED)
    expected = {name: p.detach() for name, p in build_model(config, seed=SEED).named_parameters()}
    return model, expected


def _check_shards(model: GPT, expected: dict[str, torch.Tensor]) -> set:
    """Every local shard is DTensor's own slice of the one-process parameter; returns the placements seen."""
    seen, placements = set(), set()
    for name, param in model.named_parameters():
        clean = clean_name(name)
        assert isinstance(param, DTensor), name
        full = expected[clean]
        want = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        assert torch.equal(param.to_local(), want), name
        assert torch.equal(param.full_tensor(), full), name
        placements.add(tuple(param.placements))
        seen.add(clean)
    assert seen == set(expected)
    return placements


def _check_memory(model: GPT) -> None:
    """Re-initialising each parameter (the same values again) allocates at most the largest of: its
    local shard, one row block, and the int64 index list DTensor builds to find the shard's offsets
    (``compute_local_shape_and_global_offset``; for a dimension sharded twice, one index per row of
    the full parameter: 8 bytes a row, not a row's values). Building the full parameter first, as a
    one-process init would, exceeds that for every sharded parameter larger than a block (so the
    check can see it)."""
    sharded = 0
    for name, param in model.named_parameters():
        local = param.to_local()
        bound = max(local.untyped_storage().nbytes(), block_bytes(param.shape), 8 * max(param.shape))
        before = local.clone()
        with LargestAllocation() as seen:
            init_local_shard_(model, name, param, SEED)
        assert seen.largest <= bound, (name, seen.largest, bound)
        assert torch.equal(local, before), name
        rule = model.init_rule(clean_name(name))
        if rule[0] == "normal" and param.numel() * 4 > bound:
            sharded += 1
            with LargestAllocation() as full_first:
                gpt_module.init_tensor_(torch.empty(param.shape), rule, SEED, clean_name(name))
            assert full_first.largest > bound, name
    assert sharded > 0  # some parameters are sharded and larger than a block: the bound means something


def _fsdp_rank(rank: int, world_size: int) -> None:
    model, expected = _sharded_model(ParallelDims(dp=world_size, zero_stage=3, recompute="full"))
    assert any("_checkpoint_wrapped_module." in name for name, _ in model.named_parameters())
    local_rows = model.pos_embeddings.weight.to_local().shape[0]
    assert local_rows == (19 if rank == 0 else 18)  # uneven shards
    assert _check_shards(model, expected) == {(Shard(0),)}
    _check_memory(model)


def _tp_rank(rank: int, world_size: int) -> None:
    model, expected = _sharded_model(ParallelDims(tp=world_size, dp=1))
    placements = _check_shards(model, expected)
    assert {(Shard(0),), (Shard(1),)} <= placements  # column-wise and row-wise (and vocabulary) splits
    assert model.blocks["0"].attn.wq.weight.placements == (Shard(0),)
    assert model.blocks["0"].attn.wo.weight.placements == (Shard(1),)
    _check_memory(model)


def _fsdp_tp_rank(rank: int, world_size: int) -> None:
    model, expected = _sharded_model(ParallelDims(tp=2, dp=2, zero_stage=3, sequence_parallel=True))
    placements = _check_shards(model, expected)
    # FSDP over a column-wise shard splits the same dimension twice (the dp-th chunk of the tp-th chunk);
    # over a row-wise one, the other dimension.
    assert model.blocks["0"].attn.wq.weight.placements == (_StridedShard(0, split_factor=2), Shard(0))
    assert model.blocks["0"].attn.wo.weight.placements == (Shard(0), Shard(1))
    assert len(placements) >= 3
    _check_memory(model)


def test_fsdp_shards_are_slices_of_the_one_process_init():
    run_distributed(_fsdp_rank, 2)


def test_tensor_parallel_shards_are_slices_of_the_one_process_init():
    run_distributed(_tp_rank, 2)


def test_fsdp_over_tensor_parallel_shards_are_slices_of_the_one_process_init():
    run_distributed(_fsdp_tp_rank, 4)


def test_one_process_init_after_to_empty_equals_build_model():
    config = get_preset("tiny").config()
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=CPU)
    init_local_shards(model, SEED)
    expected = dict(build_model(config, seed=SEED).named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, expected[name]), name


def test_a_buffer_without_initialiser_is_an_error():
    """``to_empty`` leaves buffers as uninitialised memory: one the init does not know must not pass."""
    with torch.device("meta"):
        model = GPT(get_preset("tiny").config())
    model.register_buffer("scale", torch.ones(3))
    model.to_empty(device=CPU)
    with pytest.raises(RuntimeError, match=r"buffers \['scale'\] have no initialiser"):
        init_local_shards(model, SEED)
