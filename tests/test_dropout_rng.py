"""Dropout under tensor and sequence parallelism (parallel/rng.py), on two gloo ranks with tp = 2: masks
of activations split over the ranks are independent (they differ), masks of activations every rank
holds whole are identical; a recomputed block redraws its forward's masks; the model-parallel
generator resumes exactly; a tensor-parallel run with dropout trains.

A dropout mask is read off directly: residual and embedding dropout from their modules' input and
output (output zero where dropped), attention dropout by replaying the attention call from the same
generator state on probe inputs (zero queries and keys: uniform probabilities; one-hot values: each
output column is one key) whose output is nonzero exactly where the mask keeps a (query, key) pair.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gptforge.model import GPT, get_preset
from gptforge.parallel.apply import parallelize
from gptforge.parallel.dims import ParallelDims
from gptforge.parallel.rng import ModelParallelRNG, model_parallel_rng
from helpers.distributed import run_distributed
from helpers.launch import losses, run_train

pytestmark = pytest.mark.dist

CPU = torch.device("cpu")
SEED = 3
P = 0.5  # half the entries dropped: masks as far from all-kept or all-dropped as they get
BATCH, SEQ = 2, 16  # SEQ <= head_dim (16 in the tiny model): the probe's one-hot values fit


def _tp_model(sequence_parallel: bool, recompute: str = "none") -> GPT:
    config = get_preset("tiny").config(dropout=P)
    # gathered logits: a plain tensor to take a loss of without the loss-parallel context
    dims = ParallelDims(tp=2, dp=1, sequence_parallel=sequence_parallel, recompute=recompute, loss_parallel=False)
    with torch.device("meta"):
        model = GPT(config)
    parallelize(model, dims, dims.build_mesh("cpu"), CPU, seed=SEED)
    return model.train()


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))  # same on all ranks


def _gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def _record_attention_masks(masks: list[torch.Tensor]):
    """Wrap F.scaled_dot_product_attention so each training call also appends its dropout mask
    [B, H_local, T, S] (True: kept), replayed from the generator state the call started from."""
    real = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        start = torch.get_rng_state()
        out = real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)
        if dropout_p > 0:
            end = torch.get_rng_state()
            torch.set_rng_state(start)  # the same shapes from the same state: the same mask
            keys, head_dim = k.shape[2], v.shape[3]
            probe_v = torch.eye(keys, head_dim).expand(v.shape)  # [B, H, S, Dh], key j -> column j
            with torch.no_grad():
                probe = real(torch.zeros_like(q), torch.zeros_like(k), probe_v, attn_mask=attn_mask,
                             dropout_p=dropout_p, is_causal=is_causal, **kwargs)
            masks.append(probe[..., :keys] != 0)
            torch.set_rng_state(end)
        return out

    return real, recording


def _attention_rank(rank: int, world_size: int) -> None:
    model = _tp_model(sequence_parallel=False)
    assert isinstance(model_parallel_rng(), ModelParallelRNG)
    masks: list[torch.Tensor] = []
    real, recording = _record_attention_masks(masks)
    F.scaled_dot_product_attention = recording
    try:
        torch.manual_seed(0)  # as the trainer: the default generator equal on every rank
        model(_tokens(model.config.vocab_size)).float().sum().backward()
    finally:
        F.scaled_dot_product_attention = real
    assert len(masks) == model.config.n_layer
    causal = torch.ones(SEQ, SEQ).tril().bool()  # [T, S], the pairs attention may keep at all
    for mask in masks:  # [B, n_head / tp, T, S]: this rank's heads
        assert mask.shape == (BATCH, model.config.n_head // 2, SEQ, SEQ)
        assert not (mask & ~causal).any()
        kept = int(mask.sum())
        assert 0 < kept < int(causal.sum()) * BATCH * mask.shape[1]  # dropout really dropped, not all
        mine, other = _gathered(mask.to(torch.uint8))
        assert not torch.equal(mine, other)  # each rank's heads drew their own mask
    # The fork left the default generator alone: still the same on both ranks.
    state_0, state_1 = _gathered(torch.get_rng_state())
    assert torch.equal(state_0, state_1)


def test_attention_dropout_masks_of_the_two_head_shards_differ():
    run_distributed(_attention_rank, 2)


def _dropout_masks(model: GPT) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One training forward; the residual dropout masks (two per block, in call order) and the
    embedding dropout's mask over the whole summed embeddings (before any sequence-parallel slice)."""
    residual: list[torch.Tensor] = []
    embedding: list[torch.Tensor] = []

    def keep(store):
        return lambda module, inputs, output: store.append(output != 0)

    hooks = [block.resid_dropout.register_forward_hook(keep(residual)) for block in model.blocks.values()]
    # prepend: see the dropout's own output, before the sequence-parallel layout keeps this rank's positions
    hooks.append(model.emb_dropout.register_forward_hook(keep(embedding), prepend=True))
    torch.manual_seed(0)
    model(_tokens(model.config.vocab_size))
    for hook in hooks:
        hook.remove()
    return residual, embedding[0]


def _residual_rank(rank: int, world_size: int, sequence_parallel: bool) -> None:
    model = _tp_model(sequence_parallel)
    residual, embedding = _dropout_masks(model)
    assert len(residual) == 2 * model.config.n_layer
    local_seq = SEQ // 2 if sequence_parallel else SEQ
    for mask in residual:
        assert mask.shape == (BATCH, local_seq, model.config.d_model)
        assert 0 < int(mask.sum()) < mask.numel()
        mine, other = _gathered(mask.to(torch.uint8))
        if sequence_parallel:  # each rank holds other positions: their masks are drawn independently
            assert not torch.equal(mine, other)
        else:  # the residual stream is replicated: every rank must drop the same entries
            assert torch.equal(mine, other)
    # The embedding dropout acts on the full summed embeddings on every rank (one replicated mask,
    # of which sequence parallelism then keeps each rank's positions).
    assert embedding.shape == (BATCH, SEQ, model.config.d_model)
    mine, other = _gathered(embedding.to(torch.uint8))
    assert torch.equal(mine, other)


def test_sequence_parallel_residual_dropout_masks_of_the_two_sequence_shards_differ():
    run_distributed(_residual_rank, 2, True)


def test_replicated_residual_dropout_masks_are_identical_across_tensor_parallel_ranks():
    run_distributed(_residual_rank, 2, False)


def _recompute_rank(rank: int, world_size: int) -> None:
    grads = []
    for recompute in ("none", "full"):
        model = _tp_model(sequence_parallel=True, recompute=recompute)
        torch.manual_seed(0)
        model(_tokens(model.config.vocab_size)).float().pow(2).mean().backward()
        grads.append({name.replace("_checkpoint_wrapped_module.", ""): p.grad.to_local()
                      for name, p in model.named_parameters()})
    plain, recomputed = grads
    assert plain.keys() == recomputed.keys()
    for name, grad in plain.items():
        # The recomputation replays the forward's ops on the same inputs with the same masks: bit-equal.
        assert torch.equal(recomputed[name], grad), name


def test_recomputed_blocks_redraw_the_forward_dropout_masks():
    """Activation checkpointing restores the model-parallel generator for the recomputation, as it
    restores the default one: gradients equal those without recomputation."""
    run_distributed(_recompute_rank, 2)


def test_fork_leaves_the_default_generator_alone_and_resumes_exactly():
    rng = ModelParallelRNG(seed=SEED, tp_rank=1)
    torch.manual_seed(0)
    default = torch.get_rng_state()
    with rng.fork():
        first = torch.rand(8)
    assert torch.equal(torch.get_rng_state(), default)
    assert not torch.equal(first, torch.rand(8))  # the default stream is another one
    saved = rng.state_dict()
    with rng.fork():
        second = torch.rand(8)
    resumed = ModelParallelRNG(seed=0, tp_rank=0)  # a fresh process's generator, then the checkpoint's state
    resumed.load_state_dict(saved)
    with resumed.fork():
        assert torch.equal(torch.rand(8), second)
    with pytest.raises(ValueError, match="cannot continue on 'cpu'"):
        resumed.load_state_dict(dict(saved, device_type="cuda"))


STEPS = 8


def test_tensor_and_sequence_parallel_training_with_dropout_learns(tmp_path, write_config):
    """tp2 with sequence parallelism and dropout 0.1: finite losses that fall (the mean of the last
    two steps below the mean of the first two, at lr 3e-3 on 4 x 32 tokens a step)."""
    run_dir = tmp_path / "run"
    cfg = write_config(run_dir=run_dir, model={"preset": "tiny", "dropout": 0.1},
                       train={"max_steps": STEPS, "eval_interval": 0, "sample_tokens": 0})
    proc = run_train(cfg, "parallel.tp=2", "parallel.sequence_parallel=true", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(math.isfinite(loss) for loss in got.values())
    assert (got[STEPS - 1] + got[STEPS]) / 2 < (got[1] + got[2]) / 2
