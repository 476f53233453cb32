"""Pipeline parallelism with ``torch.distributed.pipelining``: GPipe, 1F1B and interleaved 1F1B.

Each rank builds one *rank model*: the GPT pruned to the blocks of its stages (original names, so
checkpoints reshard to and from any layout), the embeddings on the first stage, the final LayerNorm on
the last. The last stage also keeps the token-embedding matrix for the tied output projection (as
Megatron does): both copies start equal (initialised by name) and their gradients are summed between
first and last stage every step, so they stay equal. Stage ``s`` of ``pp * virtual`` lives on rank
``s % pp`` (the interleaved layout); a rank's stages are views over its rank model.

Data parallelism under a pipeline either averages replica gradients over the "dp" ranks after the
schedule (zero_stage 0), or shards every stage with FSDP2 (zero_stage 2/3): each block is its own
FSDP unit and each stage view the root unit of the rest it calls (embeddings, final LayerNorm, the
tied matrix), so the pipeline schedule sees FSDP modules. Their gradients are reduce-scattered after
every micro-batch's backward and accumulate sharded; with ``defer_grad_reduce`` they accumulate
unsharded and are reduce-scattered once, after the step's last micro-batch (torch's schedules' own way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..model.gpt import GPT
from .dims import ParallelDims

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")


def stage_layers(n_layer: int, n_stages: int) -> list[list[int]]:
    """Contiguous, balanced layer ranges per stage (earlier stages take the remainder)."""
    base, extra = divmod(n_layer, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def local_stages(dims: ParallelDims, pp_rank: int) -> list[int]:
    return [pp_rank + v * dims.pp for v in range(dims.virtual_stages)]


def prune_to_rank(model: GPT, dims: ParallelDims, pp_rank: int) -> None:
    """Drop (on the meta device) everything this pipeline rank does not hold."""
    n_stages = dims.pp * dims.virtual_stages
    layers = stage_layers(model.config.n_layer, n_stages)
    mine = local_stages(dims, pp_rank)
    keep = {str(i) for s in mine for i in layers[s]}
    for name in list(model.blocks):
        if name not in keep:
            del model.blocks[name]
    first, last = 0 in mine, n_stages - 1 in mine
    if not first:
        model.pos_embeddings = None
        model.emb_dropout = None
        if not last:
            model.tok_embeddings = None
    if not last:
        model.norm = None


class StageView(nn.Module):
    """One pipeline stage: a slice of the rank model's blocks. The modules it calls are registered as
    its children too (so FSDP can shard a stage as one unit); parameter names, optimizer and
    checkpoints stay with the rank model."""

    def __init__(self, rank_model: GPT, layers: list[int], first: bool, last: bool) -> None:
        super().__init__()
        self._rank_model = [rank_model]  # a list: not a child, so the view is not a second model root
        self.layers, self.first, self.last = [str(i) for i in layers], first, last
        self.stage_blocks = nn.ModuleList(rank_model.blocks[name] for name in self.layers)
        parts = {}
        if first:
            parts |= {"tok_embeddings": rank_model.tok_embeddings, "pos_embeddings": rank_model.pos_embeddings}
        if last:
            parts |= {"tok_embeddings": rank_model.tok_embeddings}
            if rank_model.norm is not None:
                parts["norm"] = rank_model.norm
        self.parts = nn.ModuleDict(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._rank_model[0]
        h = model.embed(x) if self.first else x  # first stage: tokens [b, T]; others: hidden [b, T(/tp), D]
        for name in self.layers:
            h = model.blocks[name](h)
        if not self.last:
            return h
        if model.norm is not None:
            h = model.norm(h)
        return model.lm_head(h, model.tok_embeddings.weight)  # [b, T, V] (vocabulary-sharded under loss parallel)


@dataclass(kw_only=True)
class PipelineRanks:
    """This rank's place in the pipeline and the groups it talks in."""

    pp_rank: int
    pp_group: object
    embedding_group: object | None
    """First and last stage ranks with this rank's (dp, tp) coordinates: they sum the tied-embedding grads."""

    @classmethod
    def from_mesh(cls, mesh, dims: ParallelDims) -> "PipelineRanks":
        ranks = mesh.mesh  # [pp, dp, tp] of global ranks
        me = dist.get_rank()
        embedding_group = None
        for d in range(dims.dp):  # every rank creates every group, in the same order
            for t in range(dims.tp):
                members = sorted({int(ranks[0, d, t]), int(ranks[dims.pp - 1, d, t])})
                group = dist.new_group(members)
                if me in members:
                    embedding_group = group
        return cls(pp_rank=mesh["pp"].get_local_rank(), pp_group=mesh["pp"].get_group(),
                   embedding_group=embedding_group)


class PipelineRunner:
    """Runs training steps and validation forwards of a pipelined rank model."""

    def __init__(self, rank_model: GPT, dims: ParallelDims, ranks: PipelineRanks, device: torch.device,
                 schedule: str) -> None:
        self.model, self.dims, self.ranks, self.device = rank_model, dims, ranks, device
        self.schedule_name = schedule
        self.n_stages = dims.pp * dims.virtual_stages
        layers = stage_layers(rank_model.config.n_layer, self.n_stages)
        self.stage_ids = local_stages(dims, ranks.pp_rank)
        self.views = {s: StageView(rank_model, layers[s], s == 0, s == self.n_stages - 1) for s in self.stage_ids}
        self.is_first, self.is_last = 0 in self.stage_ids, self.n_stages - 1 in self.stage_ids
        self._schedules: dict[int, object] = {}
        self._loss_scale = 1.0
        self._grad_reduce: OverlappedGradReduce | None = None
        """Replicas (dp > 1 without FSDP): the gradient all-reduce that runs during the last backward."""

    def overlap_grad_reduce(self, dp_group) -> None:
        """Replicas only: all-reduce gradients in buckets while the last micro-batch's backward runs
        (``OverlappedGradReduce``); call once the parameters are materialised."""
        if self.dims.dp > 1 and not self.dims.fsdp:
            self._grad_reduce = OverlappedGradReduce(self.views, dp_group, self.dims.dp)

    def shard(self, dp_mesh, reshard_after_forward: bool, mp_policy, unit: str = "block") -> None:
        """FSDP2 over the data-parallel ranks (zero_stage 2/3), on the meta rank model before it is
        materialised: every block of every local stage (``unit``: see ``apply.shard_block``), then each
        stage view as the unit of its remaining parameters. Gradients come out reduce-scattered
        (averaged over dp) by the schedule's backwards (``_stage_class``), so ``average_over_dp`` has
        nothing to do."""
        from torch.distributed.fsdp import fully_shard

        from .apply import shard_block, shard_position_embedding  # apply imports this module

        kwargs = {"mesh": dp_mesh, "reshard_after_forward": reshard_after_forward, "mp_policy": mp_policy}
        for view in self.views.values():
            for block in view.stage_blocks:
                shard_block(block, unit, **kwargs)
            shard_position_embedding(view.parts["pos_embeddings"] if "pos_embeddings" in view.parts else None,
                                     unit, **kwargs)
            fully_shard(view, **kwargs)

    def _loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from .loss import token_loss_sum

        return token_loss_sum(logits, labels, (labels != -100)) * self._loss_scale

    def _schedule(self, n_micro: int):
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        stage_cls = _stage_class(self.dims.defer_grad_reduce, self._grad_reduce)
        stages = [stage_cls(self.views[s], s, self.n_stages, self.device, group=self.ranks.pp_group)
                  for s in self.stage_ids]
        # Losses are sums divided by the global token count already: no extra 1/n_micro scaling.
        if self.schedule_name == "interleaved-1f1b":
            return ScheduleInterleaved1F1B(stages, n_micro, loss_fn=self._loss_fn, scale_grads=False)
        cls = ScheduleGPipe if self.schedule_name == "gpipe" else Schedule1F1B
        return cls(stages[0], n_micro, loss_fn=self._loss_fn, scale_grads=False)

    def train_step(self, tokens: torch.Tensor, labels: torch.Tensor, n_micro: int,
                   loss_scale: torch.Tensor) -> torch.Tensor:
        """Forward/backward the rank's batch (tokens, labels [B, T]; masked labels are -100) through the
        pipeline in ``n_micro`` micro-batches, each loss a token sum times ``loss_scale`` (0-dim). Returns
        the sum of the scaled micro-batch losses on the device (nonzero on the last stage only)."""
        self._loss_scale = loss_scale
        if n_micro not in self._schedules:  # the batch ramp changes the micro-batch count
            self._schedules[n_micro] = self._schedule(n_micro)
        schedule = self._schedules[n_micro]
        losses: list[torch.Tensor] = []
        kwargs = {"target": labels, "losses": losses} if self.is_last else {}
        if self.is_first:
            schedule.step(tokens, **kwargs)
        else:
            schedule.step(**kwargs)
        if not self.is_last:
            return torch.zeros((), device=self.device)
        return torch.stack([_local(loss.detach()).float() for loss in losses]).sum()

    @torch.no_grad()
    def forward_logits(self, tokens: torch.Tensor, logits_fn) -> torch.Tensor | None:
        """A plain forward through all stages in order (validation, no schedule); the last stage
        returns ``logits_fn(logits)``, other ranks None. Hidden states travel by send/recv."""
        stage_rank = lambda s: dist.get_global_rank(self.ranks.pp_group, s % self.dims.pp)  # noqa: E731
        out = None
        hidden = None
        for s in range(self.n_stages):
            if s not in self.views:
                continue
            if s == 0:
                x = tokens.to(self.device)
            else:
                x = torch.empty(self._hidden_shape(tokens), dtype=torch.float32, device=self.device)
                dist.recv(x, src=stage_rank(s - 1), group=None)
            hidden = self.views[s](x)
            if s == self.n_stages - 1:
                out = logits_fn(hidden)
            else:
                # fp32 on the wire whatever the compute dtype (FSDP casts a stage's inputs back to its own)
                dist.send(hidden.float().contiguous(), dst=stage_rank(s + 1), group=None)
        return out

    def _hidden_shape(self, tokens: torch.Tensor) -> tuple[int, int, int]:
        b, seq = tokens.shape
        if self.dims.sequence_parallel:
            seq //= self.dims.tp
        return b, seq, self.model.config.d_model

    def sync_gradients(self) -> None:
        """Sum the tied-embedding gradient between first and last stage; average over data-parallel ranks."""
        if self.ranks.embedding_group is not None and self.model.tok_embeddings is not None:
            weight = self.model.tok_embeddings.weight
            grad = weight.grad
            if grad is None or dist.get_world_size(self.ranks.embedding_group) == 1:
                return
            if isinstance(grad, DTensor) and grad.placements != weight.placements:
                # The embedding lookup's backward can leave a replicated gradient while the head's is
                # vocabulary-sharded: lay both out like the weight (a local slice) so the shards match.
                grad = weight.grad = grad.redistribute(weight.device_mesh, weight.placements)
            dist.all_reduce(_local(grad), group=self.ranks.embedding_group)

    def average_over_dp(self, dp_group) -> None:
        """Average the replicas' gradients: wait for the buckets the last backward started (the tied
        embedding's gradient after its sum between first and last stage, ``sync_gradients``)."""
        if self.dims.dp == 1 or self.dims.fsdp:  # FSDP reduce-scattered them in backward
            return
        if self._grad_reduce is None:  # a runner built outside parallelize: nothing was armed, all is reduced here
            self.overlap_grad_reduce(dp_group)
        self._grad_reduce.finish()
        embedding = self.model.tok_embeddings
        if embedding is not None and embedding.weight.grad is not None:
            local = _local(embedding.weight.grad)
            dist.all_reduce(local, group=dp_group)
            local.div_(self.dims.dp)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global grad norm over all stages (the tied embedding counted once), then clip, as
        ``torch.nn.utils.clip_grad_norm_`` would on the whole model. Returns the norm on the device
        (nothing waits for the GPU)."""
        grads = []
        for name, param in self.model.named_parameters():
            if param.grad is None:
                continue
            if name == "tok_embeddings.weight" and self.is_last and not self.is_first:
                continue  # the first stage counts it
            grads.append(param.grad)
        local = torch.zeros((), dtype=torch.float64, device=self.device)
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            local = norm.double() ** 2
        dist.all_reduce(local, group=self.ranks.pp_group)
        total = local.sqrt()
        if max_norm > 0:
            # As torch's clip_grad_norm_: a coefficient of 1 where the norm is within the bound.
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0).float()
            local_grads = [_local(p.grad) for p in self.model.parameters() if p.grad is not None]
            torch._foreach_mul_(local_grads, coef)
        return total.float()


class OverlappedGradReduce:
    """The data-parallel all-reduce of pipeline replicas' gradients, overlapped with the last backward.

    Parameters are grouped into buckets of about ``bucket_bytes`` (DDP's 25 MiB) in reverse order of
    definition, the order the backward finishes them. During the last micro-batch's backward of a stage
    (``arm``), each parameter's post-accumulate hook marks it final; a bucket whose parameters are all final
    is flattened and its all-reduce started at once, so communication runs while the backward goes on.
    ``finish`` starts what is left (a parameter without a gradient), waits, averages and copies back. Every
    replica runs the same graph, so the buckets start in the same order everywhere. The tied token
    embedding is left out: its gradient is summed between the first and last stage after the schedule,
    then averaged (``PipelineRunner.average_over_dp``)."""

    def __init__(self, views: dict, dp_group, dp: int, bucket_bytes: int = 25 * 2**20) -> None:
        self.group, self.dp = dp_group, dp
        self.armed: set[int] = set()
        self.buckets: list[list[torch.nn.Parameter]] = []
        self._bucket_of: dict[int, int] = {}
        self._stage_of: dict[int, int] = {}
        self._work: dict[int, tuple[torch.Tensor, object]] = {}
        for stage_id, view in views.items():
            params = [p for name, p in view.named_parameters()
                      if p.requires_grad and not name.endswith("tok_embeddings.weight")]
            size = bucket_bytes  # start a new bucket per stage
            for param in reversed(params):
                nbytes = _local(param).numel() * param.element_size()
                if size + nbytes > bucket_bytes:
                    self.buckets.append([])
                    size = 0
                self.buckets[-1].append(param)
                size += nbytes
                self._bucket_of[id(param)] = len(self.buckets) - 1
                self._stage_of[id(param)] = stage_id
                param.register_post_accumulate_grad_hook(self._on_grad)
        self._ready = [0] * len(self.buckets)
        """Final parameters of each bucket in this step's armed backward."""

    def arm(self, stage_id: int) -> None:
        """The next backward of ``stage_id`` is its last of the step."""
        self.armed.add(stage_id)

    def _on_grad(self, param: torch.Tensor) -> None:
        if self._stage_of[id(param)] not in self.armed:
            return
        index = self._bucket_of[id(param)]
        self._ready[index] += 1
        if self._ready[index] == len(self.buckets[index]):
            self._start(index)

    def _start(self, index: int) -> None:
        grads = [_local(p.grad) for p in self.buckets[index] if p.grad is not None]
        if not grads:
            self._work[index] = (None, None)
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._work[index] = (flat, dist.all_reduce(flat, group=self.group, async_op=True))

    def finish(self) -> None:
        for index in range(len(self.buckets)):
            if index not in self._work:
                self._start(index)
        for index, (flat, work) in sorted(self._work.items()):
            if flat is None:
                continue
            work.wait()
            flat.div_(self.dp)
            offset = 0
            for param in self.buckets[index]:
                if param.grad is None:
                    continue
                grad = _local(param.grad)
                grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
                offset += grad.numel()
        self._work.clear()
        self._ready = [0] * len(self.buckets)
        self.armed.clear()


def _stage_class(defer_grad_reduce: bool, grad_reduce: OverlappedGradReduce | None = None):
    """The ``PipelineStage`` to build. torch's stage turns FSDP gradient sync off for every
    micro-batch's backward and reduce-scatters once after the last (so the unsharded gradients of the
    whole stage accumulate until then): kept with ``defer_grad_reduce``. Otherwise each backward
    reduce-scatters and the gradients accumulate sharded; the schedule's closing reduction then finds
    nothing left to reduce and only finalises (waits for the reductions in flight)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.pipelining import PipelineStage

    if grad_reduce is not None:  # replicas: the last backward starts the gradient all-reduce
        class OverlappedReduceStage(PipelineStage):
            def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
                if last_backward:
                    grad_reduce.arm(self.stage_index)
                return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)

        return OverlappedReduceStage
    if defer_grad_reduce:
        return PipelineStage

    class ShardedGradStage(PipelineStage):
        def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
            if not isinstance(self.submod, FSDPModule):
                return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
            from torch.distributed.pipelining._backward import stage_backward

            if backward_type != "full":  # the schedules used here (SCHEDULES) run whole backwards only
                raise AssertionError(f"unexpected split backward {backward_type!r} of a pipeline stage")
            # As torch's stage, but with gradient sync on: parameters stay gathered across micro-batches
            # (the schedule reshards them at the end) and the step is finalised once, after the last.
            self.submod.set_is_last_backward(False)
            self.submod.set_reshard_after_backward(False)
            self.submod.set_requires_gradient_sync(True)
            grads = stage_backward(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"])
            return grads, None

    return ShardedGradStage


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor to hand to a collective in place: a DTensor's local shard (outside autograd,
    ``to_local`` returns the shard itself, not a copy)."""
    if not isinstance(tensor, DTensor):
        return tensor
    with torch.no_grad():
        return tensor.to_local()
