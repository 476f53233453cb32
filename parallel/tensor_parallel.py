"""Tensor (and sequence) parallelism for the GPT of ``gptforge.model``, applied by module name.

Megatron's split with DTensor styles: q/k/v and MLP-in column-wise, attention-out and MLP-out row-wise,
the token embedding row-wise over the (padded) vocabulary, and the tied output projection computed
against that same vocabulary-sharded matrix. Parameters no style shards (position embeddings,
LayerNorms without sequence parallelism) become replicated DTensors, so every parameter is a DTensor on
the "tp" mesh and gradient clipping sees one consistent set.

With ``sequence_parallel`` the LayerNorm/dropout regions hold [B, T/tp, D] sequence shards: the
embedding output is sliced to its shard, attention and MLP inputs are all-gathered, their outputs
reduce-scattered back to shards.

Dropout (parallel/rng.py): the attention probabilities are split by head, and with sequence
parallelism the residual dropout acts on sequence shards; both draw from the per-rank model-parallel
generator (``use_model_parallel_rng``). The embedding dropout acts on the full summed embeddings,
before the sequence-parallel slice, so it draws one replicated mask from the default generator and
each rank keeps its positions of it.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from ..model.gpt import Attention, Block
from .rng import ModelParallelRNG


class ReplicateParallel(ParallelStyle):
    """Parameters replicated as DTensors; plain tensors in and out (what the surrounding code sees)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(mod, inputs, mesh):
            return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False)
                         if hasattr(t, "dim") and not isinstance(t, DTensor) else t for t in inputs)

        def to_local(mod, output, mesh):
            return output.to_local() if isinstance(output, DTensor) else output

        return distribute_module(module, device_mesh, input_fn=to_dtensor, output_fn=to_local)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool,
                          loss_parallel: bool) -> None:
    """Shard ``model`` (a ``gptforge.model.GPT``) in place over ``tp_mesh``."""
    sp = sequence_parallel
    act = Shard(1) if sp else Replicate()  # layout of activations between sub-blocks: [B, T(/tp), D]
    norm_style = SequenceParallel() if sp else ReplicateParallel()
    # A pipeline stage holds only some of these modules (parallel/pipeline.py prunes the rest to None).
    plan: dict[str, ParallelStyle] = {"lm_head": tied_head_style(act, loss_parallel)}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if model.pos_embeddings is not None:
        plan["pos_embeddings"] = ReplicateParallel()
    if sp and model.emb_dropout is not None:
        # the summed embeddings are full on every rank: keep this rank's sequence shard (no communication)
        plan["emb_dropout"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1))
    if getattr(model, "norm", None) is not None:
        plan["norm"] = norm_style
    for name in model.blocks:
        prefix = f"blocks.{name}"
        plan |= {
            f"{prefix}.ln_1": norm_style,
            f"{prefix}.ln_2": norm_style,
            f"{prefix}.attn": PrepareModuleInput(input_layouts=(act,), desired_input_layouts=(Replicate(),)),
            f"{prefix}.attn.wq": ColwiseParallel(),
            f"{prefix}.attn.wk": ColwiseParallel(),
            f"{prefix}.attn.wv": ColwiseParallel(),
            f"{prefix}.attn.wo": RowwiseParallel(output_layouts=act),
            f"{prefix}.mlp": PrepareModuleInput(input_layouts=(act,), desired_input_layouts=(Replicate(),)),
            f"{prefix}.mlp.fc_in": ColwiseParallel(),
            f"{prefix}.mlp.fc_out": RowwiseParallel(output_layouts=act),
        }
    parallelize_module(model, tp_mesh, plan)


def tied_head_style(act, loss_parallel: bool) -> ParallelStyle:
    """The tied head: gather the hidden states, multiply by the vocabulary-sharded embedding matrix
    (output [B, T, V/tp] per rank). With ``loss_parallel`` the logits stay a vocabulary-sharded DTensor
    for the parallel cross-entropy; otherwise they are gathered to full [B, T, V] on every rank."""
    return PrepareModuleInputOutput(
        input_layouts=(act, None), desired_input_layouts=(Replicate(), None), use_local_input=False,
        output_layouts=Shard(-1), desired_output_layouts=Shard(-1) if loss_parallel else Replicate(),
        use_local_output=not loss_parallel,
    )


def use_model_parallel_rng(model: nn.Module, rng: ModelParallelRNG, *, sequence_parallel: bool) -> None:
    """Make the dropout of activations that ``apply_tensor_parallel`` splits over ranks draw from ``rng``:
    attention probabilities (heads split) always, the residual dropout with ``sequence_parallel``
    (positions split); without it the residual stream is replicated and keeps the default generator."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.dropout_rng = rng.fork
        elif isinstance(module, Block) and sequence_parallel:
            module.resid_dropout_rng = rng.fork
