"""The parallel building blocks on two gloo ranks, each against the one-process computation it replaces:
loss-parallel cross-entropy, tensor-parallel initialisation, FSDP2 gradient reduction per micro-batch
and deferred to the last one.

Tolerances come from the fp32 bound on reordering a sum (tests/helpers/tolerance.py:
``reduction_tolerance``, with the shapes of each sum); where nothing is summed in another order the test
asks for bit-equality.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from gptforge.model import GPT, build_model, get_preset, lm_loss_sum
from gptforge.parallel.apply import no_grad_sync, parallelize
from gptforge.parallel.dims import ParallelDims
from gptforge.parallel.loss import loss_context, token_loss_sum
from helpers.distributed import DistributedTestError, run_distributed
from helpers.tolerance import reduction_tolerance, unit_roundoff

pytestmark = pytest.mark.dist

U = unit_roundoff(torch.float32)
CPU = torch.device("cpu")
SEED = 11


# ------------------------------------------------------------------- the helper itself

def _fails_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError(f"deliberate failure on rank {rank}")
    dist.barrier()  # rank 0 waits for a peer that never comes: run_distributed has to stop it


def test_a_failing_rank_fails_the_test_with_its_traceback():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_fails_on_rank_one, 2)
    message = str(info.value)
    assert message.startswith("rank 1 of 2 raised first:")  # the cause, before rank 0's broken barrier
    assert "in _fails_on_rank_one" in message and "ValueError: deliberate failure on rank 1" in message


# ------------------------------------------------------------------- loss-parallel cross-entropy

BATCH, SEQ, VOCAB = 3, 8, 64


def _loss_parallel_rank(rank: int, world_size: int) -> None:
    dims = ParallelDims(tp=world_size, dp=1)
    mesh = dims.build_mesh("cpu")
    generator = torch.Generator().manual_seed(0)  # the same logits, labels and mask on every rank
    logits = 3 * torch.randn(BATCH, SEQ, VOCAB, generator=generator)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    mask = (torch.rand(BATCH, SEQ, generator=generator) > 0.25).long()
    assert 0 < int(mask.sum()) < mask.numel()  # masked and unmasked tokens both occur

    full = logits.clone().requires_grad_()
    reference = lm_loss_sum(full, labels, mask)
    reference.backward()

    sharded = distribute_tensor(logits, mesh["tp"], [Shard(2)]).requires_grad_()
    assert sharded.to_local().shape == (BATCH, SEQ, VOCAB // world_size)  # each rank holds V / tp
    with loss_context(dims):  # the backward must run inside the context too
        loss = token_loss_sum(sharded, labels, mask)
        loss.backward()

    # Only the sum of each token's VOCAB exponentials is evaluated in another order (two halves, then
    # an all-reduce; the maximum subtracted first is the same on both sides, and so are the
    # exponentials of equal arguments). Its relative error is its logarithm's absolute error; the
    # logarithm and the subtraction of the label's logit round once more each, by u of their results,
    # in each evaluation. The loss then sums the BATCH * SEQ masked token losses, maybe in another order.
    per_token = reduction_tolerance(VOCAB, 1 / VOCAB)  # relative: the terms average 1/VOCAB of their sum; 5.7e-6
    weight = mask.flatten().float()
    log_sum_exp = torch.logsumexp(logits.flatten(0, 1), dim=-1)  # [B*T]
    token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    loss_bound = (float(weight.sum()) * per_token + 2 * U * float((weight * (log_sum_exp.abs() + token_loss)).sum())
                  + reduction_tolerance(BATCH * SEQ, float(reference) / (BATCH * SEQ)))
    torch.testing.assert_close(loss, reference, rtol=0, atol=loss_bound)
    assert isinstance(sharded.grad, DTensor) and sharded.grad.placements == (Shard(2),)
    # The gradient, softmax minus one-hot: exp(logit - log-sum-exp) moves by the log-sum-exp's error
    # times the probability (<= 1), plus the exponential's and the subtraction's roundings.
    torch.testing.assert_close(sharded.grad.to_local(), full.grad.chunk(world_size, dim=2)[rank],
                               rtol=0, atol=per_token + 4 * U)  # 4u: two roundings of values <= 1, each side


def test_loss_parallel_cross_entropy_equals_one_process_loss_and_gradient():
    run_distributed(_loss_parallel_rank, 2)


# ------------------------------------------------------------------- tensor-parallel initialisation

def _tp_init_rank(rank: int, world_size: int) -> None:
    config = get_preset("tiny").config()
    dims = ParallelDims(tp=world_size, dp=1)
    with torch.device("meta"):
        model = GPT(config)
    parallelize(model, dims, dims.build_mesh("cpu"), CPU, seed=SEED)
    expected = dict(build_model(config, seed=SEED).named_parameters())

    seen, sharded = set(), set()
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor), name  # every parameter lives on the tp mesh
        (placement,) = param.placements
        full = expected[name].detach()
        if isinstance(placement, Shard):
            sharded.add((name.split(".")[-2], placement.dim))
            full = full.chunk(world_size, dim=placement.dim)[rank]
        # Every element comes from the same (seed, name, row block) generator on both sides, whichever
        # slice a rank draws; nothing is computed from other elements: bit-equal by construction.
        assert torch.equal(param.to_local(), full), name
        seen.add(name)
    assert seen == set(expected)
    # Megatron's split: column-parallel q/k/v and MLP-in, row-parallel out-projections, the vocabulary rows.
    assert {("wq", 0), ("wk", 0), ("wv", 0), ("fc_in", 0), ("wo", 1), ("fc_out", 1), ("tok_embeddings", 0)} <= sharded


def test_tensor_parallel_init_equals_slices_of_one_process_init():
    run_distributed(_tp_init_rank, 2)


# ------------------------------------------------------------------- FSDP2 gradient reduction

MICRO, MICRO_SEQ, MICRO_BATCHES = 2, 16, 2
REDUCTIONS = ("reduce_scatter_single", "reduce_scatter_tensor", "all_reduce")


@contextlib.contextmanager
def counting_reductions(counts: dict[str, int]):
    """Count the gradient collectives FSDP2 issues (it looks them up on torch.distributed per call)."""
    originals = {name: getattr(dist, name) for name in REDUCTIONS}

    def counted(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in REDUCTIONS:
        setattr(dist, name, counted(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _fsdp_rank(rank: int, world_size: int, defer: bool) -> None:
    config = get_preset("tiny").config()
    assert config.dropout == 0.0  # a deterministic forward: the same micro-batch gives the same gradient
    dims = ParallelDims(tp=1, dp=world_size, zero_stage=2, defer_grad_reduce=defer)
    with torch.device("meta"):
        model = GPT(config)
    module, _ = parallelize(model, dims, dims.build_mesh("cpu"), CPU, seed=SEED)
    units = config.n_layer + 1  # FSDP units: each block and the root

    generator = torch.Generator().manual_seed(1)  # every rank draws all batches and trains on its own
    batches = [[(torch.randint(0, config.vocab_size, (MICRO, MICRO_SEQ), generator=generator),
                 torch.randint(0, config.vocab_size, (MICRO, MICRO_SEQ), generator=generator),
                 (torch.rand(MICRO, MICRO_SEQ, generator=generator) > 0.2).long())
                for _ in range(MICRO_BATCHES)] for _ in range(world_size)]
    global_tokens = float(sum(int(mask.sum()) for per_rank in batches for _, _, mask in per_rank))

    counts = dict.fromkeys(REDUCTIONS, 0)
    with counting_reductions(counts):
        for i, (tokens, labels, mask) in enumerate(batches[rank]):
            last = i == MICRO_BATCHES - 1
            with contextlib.nullcontext() if last else no_grad_sync(module, dims):
                # as training/steps.py: FSDP averages over dp, so dp / global tokens gives the global mean
                (token_loss_sum(module(tokens), labels, mask) * (dims.dp / global_tokens)).backward()
            if last:
                continue
            if defer:
                assert sum(counts.values()) == 0, counts  # nothing reduced inside no_grad_sync
                assert all(p.grad is None for p in model.parameters())  # no sharded gradient yet
            else:  # no_grad_sync does nothing: this micro-batch's gradients are reduce-scattered already
                assert counts == {"reduce_scatter_single": units * (i + 1), "reduce_scatter_tensor": 0,
                                  "all_reduce": 0}, counts
                for name, param in model.named_parameters():  # and kept as this rank's shard only
                    assert param.grad.to_local().numel() == param.to_local().numel(), name
    # deferred: one reduce-scatter per unit after the last micro-batch; default: one per micro-batch
    expected_counts = units if defer else units * MICRO_BATCHES
    assert counts == {"reduce_scatter_single": expected_counts, "reduce_scatter_tensor": 0, "all_reduce": 0}, counts

    reference = build_model(config, seed=SEED)
    terms = []  # the gradient of every micro-batch of every rank, one process
    for per_rank in batches:
        for tokens, labels, mask in per_rank:
            reference.zero_grad(set_to_none=True)
            (lm_loss_sum(reference(tokens), labels, mask) * (dims.dp / global_tokens)).backward()
            terms.append({name: p.grad.clone() for name, p in reference.named_parameters()})
    n = len(terms)
    for name, param in model.named_parameters():
        assert param.grad.to_local().shape == param.to_local().shape, name  # sharded like its parameter
        got = param.grad.full_tensor()
        # Each micro-batch's gradient is the one-process one (same weights, ops and shapes); only the
        # order of adding the n = dp x micro-batches terms differs (deferred: a rank's micro-batches,
        # then the ranks; default: the ranks, then the micro-batches). Dividing by dp (a power of two)
        # is exact.
        expected = sum(term[name] for term in terms) / dims.dp
        bound = reduction_tolerance(n, sum(term[name].abs() for term in terms) / (n * dims.dp))
        excess = (got - expected).abs() - bound
        assert float(excess.max()) <= 0, f"{name}: exceeds the reordering bound by {float(excess.max())}"


def test_fsdp_reduces_gradients_every_micro_batch_and_stays_sharded():
    run_distributed(_fsdp_rank, 2, False)


def test_fsdp_defer_grad_reduce_reduces_once_after_the_last_micro_batch():
    run_distributed(_fsdp_rank, 2, True)
