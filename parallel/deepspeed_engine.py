"""ZeRO stages 1, 2 and 3 (with optional optimizer CPU offload) through the DeepSpeed engine.

Data parallelism only (tp = pp = 1): the engine owns gradient reduction, partitioning, clipping and
the optimizer step. The step's number of micro-batches follows GPT-3's batch ramp through
``set_train_batch_size``; losses arrive already divided by the global token count, so the engine's own
1/accumulation scaling is off.

ZeRO-3 models are built under ``deepspeed.zero.Init``: no rank builds the whole model, and each
initialises only its own partition of every parameter, to the values the one-process model has there.
Checkpoints are sharded the same way under every stage: each rank writes only the fp32 master weights
and Adam moments of its own optimizer partition, as pieces of the full, named parameters, with
``torch.distributed.checkpoint`` like every other layout, so they reshard to and from every layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._shard import sharded_tensor
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec

from .dims import ParallelDims

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
# What a rank keeps of each parameter: its fp32 master weights (None) and the Adam moments.
_STATES = (None, *ADAM_MOMENTS)


MIN_BUCKET = 2**20
"""The smallest bucket in elements (4 MiB in fp32): below it tiny models make many tiny collectives."""


def zero_buffers(d_model: int, zero_stage: int) -> dict:
    """The bucket and gathering limits of ``zero_optimization``, scaled with the model's width the way
    Hugging Face Transformers fills DeepSpeed's ``auto`` values: d^2 elements per gradient-reduction and
    all-gather bucket, 0.9 d^2 prefetched, parameters under 10 d elements kept gathered (biases and
    LayerNorms). DeepSpeed's defaults are absolute: a 5e8-element reduce bucket is 2 GB of fp32 per rank
    whatever the model. ZeRO-3 also releases each gathered parameter after its use (reuse distance 0, as
    FSDP's ZeRO-3 reshards after forward; DeepSpeed's default of 1e9 keeps every parameter used in forward
    gathered until backward, the whole 125M model per rank: 14.7 bytes/param measured at dp8,
    docs/benchmarks.md), with at most two blocks' worth (24 d^2) live."""
    bucket = max(d_model * d_model, MIN_BUCKET)
    zero: dict = {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if zero_stage == 3:
        zero |= {"stage3_prefetch_bucket_size": max(9 * d_model * d_model // 10, MIN_BUCKET),
                 "stage3_param_persistence_threshold": 10 * d_model,
                 "stage3_max_reuse_distance": 0,
                 "stage3_max_live_parameters": max(24 * d_model * d_model, MIN_BUCKET)}
    return zero


def deepspeed_config(*, dims: ParallelDims, d_model: int, micro_batch: int, global_batch: int, precision: str,
                     grad_clip: float) -> dict:
    """The engine's config for a layout and a model of width ``d_model`` (``zero_buffers``)."""
    zero: dict = {"stage": dims.zero_stage, **zero_buffers(d_model, dims.zero_stage)}
    if dims.optimizer_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": global_batch // (micro_batch * dims.dp),
        "train_batch_size": global_batch,
        "zero_optimization": zero,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Our torch AdamW (GPT-3's betas, decoupled decay groups) is the client optimizer, also when offloaded.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _init_comm() -> None:
    import deepspeed

    # The process group already exists (gloo or NCCL); DeepSpeed reuses it.
    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False, dist_init_required=False)


def param_shape(param: torch.nn.Parameter) -> torch.Size:
    """The full shape of ``param`` (a ZeRO-3 parameter's own tensor is empty while it is partitioned)."""
    return getattr(param, "ds_shape", param.shape)


def build_model(config, ds_config: dict, device: torch.device, seed: int) -> torch.nn.Module:
    """The GPT of ``config`` on ``device``, initialised from (seed, parameter name) like every layout.

    ZeRO-3 (``ds_config``'s stage 3): partitioned as it is built, each rank initialising only its own
    partition of every parameter. ZeRO-1/2 keep the module replicated (only optimizer state and
    gradients are partitioned), so it is built whole, on the meta device first."""
    from ..model.gpt import GPT

    if ds_config["zero_optimization"]["stage"] == 3:
        return _build_partitioned(config, ds_config, device, seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def _build_partitioned(config, ds_config: dict, device: torch.device, seed: int) -> torch.nn.Module:
    import deepspeed

    from ..model.gpt import GPT

    _init_comm()
    # zero.Init allocates a module's own parameters in its constructor, gives them torch's default
    # initialisation and partitions them when the constructor returns, so a rank holds at most one
    # module's parameters whole, never the model's. That initialisation is overwritten below; it draws
    # from forked generators so that the run's seeded RNG streams are those of every other layout.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = GPT(config)
    for name, param in model.named_parameters():
        _init_partition_(param, model.init_rule(name), seed, name)
    return model


@torch.no_grad()
def _init_partition_(param: torch.nn.Parameter, rule: tuple[str, float], seed: int, name: str) -> None:
    """Fill this rank's ZeRO-3 partition of ``param`` with the one-process model's values of those
    elements (and the padding after the parameter's last element with zeros)."""
    from ..model.gpt import init_flat_range_

    part = param.ds_tensor  # [partition numel]: this rank's slice of the flattened, padded parameter
    frag = local_fragment(param)
    values = torch.zeros(part.ds_numel, dtype=torch.float32, device=part.device)
    init_flat_range_(values[:frag.numel], rule, seed, name, param.ds_shape, frag.start)
    # Drawn in fp32 and rounded once to the partition's dtype, as casting the fp32 model would do.
    part.copy_(values)


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """Wrap ``model`` (initialised, on its device) and ``optimizer`` in a DeepSpeed engine."""
    import deepspeed

    _init_comm()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def set_batch(engine, batch: int) -> None:
    """Sequences in the next step (the batch ramp changes the accumulation count)."""
    if engine.train_batch_size() != batch:
        engine.set_train_batch_size(batch)


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


@dataclass(frozen=True, kw_only=True)
class Fragment:
    """Elements [start, start + numel) of a flattened parameter: the part of its fp32 master weights
    and Adam moments that one rank's optimizer holds (numel 0: none)."""

    start: int
    numel: int


def local_fragment(param: torch.nn.Parameter) -> Fragment:
    """This rank's fragment of ``param`` (a ZeRO-3 parameter, or one in a ZeRO-1/2 engine)."""
    if hasattr(param, "ds_id"):
        import deepspeed.comm as ds_comm

        # ZeRO-3 splits every parameter into world equal partitions, the last padded: rank r holds
        # elements [r * size, (r + 1) * size) of it (partition_parameters.py, _partition_param).
        size = param.ds_tensor.ds_numel
        start = size * ds_comm.get_rank(group=param.ds_process_group)
        return Fragment(start=start, numel=max(0, min(size, param.ds_numel - start)))
    # ZeRO-1/2 split the flattened parameter group evenly: a parameter lies in one rank's partition
    # or straddles a few (link_hp_params leaves None where this rank's misses it).
    mapping = param._hp_mapping
    if mapping is None:
        return Fragment(start=0, numel=0)
    return Fragment(start=mapping.lp_fragment_address.start, numel=mapping.lp_fragment_address.numel)


Box = tuple[int, tuple[int, ...], tuple[int, ...]]
"""(flat index of its first element, offsets, sizes): a box of a tensor that is a contiguous run of its
flattening."""


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """Elements [start, stop) of a flattened tensor of ``shape`` as boxes of the tensor, in order. In
    two dimensions at most three: a partial first row, whole rows, a partial last row (in n dimensions
    at most 2n - 1)."""
    if stop <= start:
        return []
    if len(shape) == 1:
        return [(start, (start,), (stop - start,))]
    inner = math.prod(shape[1:])
    first, first_col = divmod(start, inner)
    last, last_col = divmod(stop, inner)  # rows [first, last) and then last_col elements of row `last`

    def within(row: int, lo: int, hi: int) -> list[Box]:
        return [(row * inner + flat, (row, *offsets), (1, *sizes))
                for flat, offsets, sizes in flat_range_boxes(shape[1:], lo, hi)]

    if first == last:
        return within(first, first_col, last_col)
    boxes = []
    if first_col:
        boxes += within(first, first_col, inner)
        first += 1
    if last > first:
        boxes.append((first * inner, (first,) + (0,) * (len(shape) - 1), (last - first, *shape[1:])))
    if last_col:
        boxes += within(last, 0, last_col)
    return boxes


@dataclass(kw_only=True)
class _Layout:
    """How one parameter's fp32 state is sharded over the ranks (its weights and both moments alike):
    every rank's boxes as a sharding spec, and this rank's, in the spec's order, as (offset in its
    fragment, numel)."""

    shape: tuple[int, ...]
    spec: EnumerableShardingSpec
    local: list[tuple[int, int]]
    local_meta: list[ShardMetadata]
    """This rank's boxes, in the order of ``local``."""


def _layout(shape: tuple[int, ...], fragments: tuple[Fragment, ...], rank: int) -> _Layout:
    shards, local, local_meta = [], [], []
    for r, frag in enumerate(fragments):
        for flat, offsets, sizes in flat_range_boxes(shape, frag.start, frag.start + frag.numel):
            shards.append(ShardMetadata(shard_offsets=list(offsets), shard_sizes=list(sizes),
                                        placement=f"rank:{r}/cpu"))
            if r == rank:
                local.append((flat - frag.start, math.prod(sizes)))
                local_meta.append(shards[-1])
    # The spec checks once here that the boxes tile the parameter; tensors made from it do not again.
    return _Layout(shape=shape, spec=EnumerableShardingSpec(shards), local=local, local_meta=local_meta)


def _layouts(model: torch.nn.Module) -> dict[str, _Layout]:
    """Every parameter's layout, from one all-gather of the ranks' fragments (collective). Parameters
    of one shape are usually split alike (always under ZeRO-3): they share a layout."""
    mine = {name: local_fragment(param) for name, param in model.named_parameters()}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    rank, built, layouts = dist.get_rank(), {}, {}
    for name, param in model.named_parameters():
        key = (tuple(param_shape(param)), tuple(fragments[name] for fragments in everyone))
        if key not in built:
            built[key] = _layout(*key, rank)
        layouts[name] = built[key]
    return layouts


def _empty_sharded(layout: _Layout) -> ShardedTensor:
    """A parameter-shaped fp32 ShardedTensor with this rank's boxes allocated (on the CPU), empty."""
    return sharded_tensor.empty(layout.spec, *layout.shape, dtype=torch.float32)


def _to_sharded(layout: _Layout, fragment: torch.Tensor) -> ShardedTensor:
    """A ShardedTensor over this rank's ``fragment`` [numel]: its local shards are views of the fragment
    where it is a contiguous fp32 CPU tensor (so a save holds no second copy of the rank's state beside
    the asynchronous save's staging), copies on the CPU otherwise (a GPU partition)."""
    if not (fragment.device.type == "cpu" and fragment.dtype == torch.float32 and fragment.is_contiguous()):
        sharded = _empty_sharded(layout)
        for shard, (offset, numel) in zip(sharded.local_shards(), layout.local):  # both in the spec's order
            shard.tensor.view(-1).copy_(fragment[offset:offset + numel])
        return sharded
    fragment = fragment.detach()  # a view: ZeRO-1/2's fp32 partition is a parameter
    shards = [Shard(tensor=fragment[offset:offset + numel].view(meta.shard_sizes), metadata=meta)
              for (offset, numel), meta in zip(layout.local, layout.local_meta)]
    metadata = layout.spec.build_metadata(torch.Size(layout.shape), TensorProperties(dtype=torch.float32))
    # No collective: the spec was checked once when the layout was built from every rank's fragments.
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, metadata, sharding_spec=layout.spec)


def _from_sharded(layout: _Layout, sharded: ShardedTensor, numel: int) -> torch.Tensor:
    """This rank's fragment [numel] from the local shards of ``sharded`` (made by ``_empty_sharded``)."""
    fragment = torch.empty(numel)
    for shard, (offset, size) in zip(sharded.local_shards(), layout.local):
        fragment[offset:offset + size].copy_(shard.tensor.view(-1))
    return fragment


def _local_state(param: torch.nn.Parameter, key: str | None) -> torch.Tensor:
    """This rank's fragment [numel] of ``param``'s fp32 master weights (``key`` None) or of its Adam
    moment ``key``; a view of the optimizer's flat partition where that is on this device."""
    frag = local_fragment(param)
    if hasattr(param, "ds_id"):
        return _zero3_partition(param, key)[:frag.numel]  # the rest of the partition is padding
    if frag.numel == 0:
        return torch.empty(0)
    return param._hp_mapping.get_hp_fragment(key)


def _zero3_partition(param: torch.nn.Parameter, key: str | None) -> torch.Tensor:
    """This rank's whole ZeRO-3 partition [partition numel] of the state ``key`` (None: the weights)."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    return safe_get_local_fp32_param(param) if key is None else safe_get_local_optimizer_state(param, key)


@torch.no_grad()
def _set_local_state(param: torch.nn.Parameter, key: str | None, values: torch.Tensor) -> None:
    """Write ``values`` [numel] into this rank's fragment of the state ``_local_state`` reads."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    frag = local_fragment(param)
    if frag.numel == 0:
        return
    if hasattr(param, "ds_id"):  # the setters take the whole partition: its padding is kept
        padded = _zero3_partition(param, key).clone()
        padded[:frag.numel].copy_(values)
        if key is None:
            safe_set_local_fp32_param(param, padded)
        else:
            safe_set_local_optimizer_state(param, padded, key)
        return
    param._hp_mapping.get_hp_fragment(key).copy_(values)


def full_state_dicts(engine, model: torch.nn.Module, step: int) -> tuple[dict, dict]:
    """Model and optimizer state of this rank, keyed by parameter name at the full parameter shapes,
    in the layout of ``torch.distributed.checkpoint.state_dict.get_state_dict`` with
    ``flatten_optimizer_state_dict`` ("state.<name>.exp_avg", "param_groups.<name>.lr"; fp32 master
    weights, Adam moments, step), so a DeepSpeed run writes the same checkpoints as every other layout
    and reshards to and from them.

    Sharded, not full: weights and moments are ShardedTensors whose local shards hold (copied to the
    CPU) this rank's own fragment of each parameter in the engine's fp32 partition, as at most three
    boxes of the parameter (``flat_range_boxes``): about 1/world of the model's state in all.
    ``torch.distributed.checkpoint`` writes each rank's boxes. Every rank calls this (one all-gather of
    the fragments' positions)."""
    _link_optimizer_state(engine)
    layouts = _layouts(model)
    model_sd, optim_sd = {}, {}
    for name, param in model.named_parameters():
        # Copies (on the CPU): the engine's partitions change at the next step, and a save may still
        # be writing in the background then.
        model_sd[name] = _to_sharded(layouts[name], _local_state(param, None))
        optim_sd[f"state.{name}.step"] = torch.tensor(float(step))
        for key in ADAM_MOMENTS:
            optim_sd[f"state.{name}.{key}"] = _to_sharded(layouts[name], _local_state(param, key))
    shapes = {n: param_shape(p) for n, p in model.named_parameters()}
    for group, decayed in zip(engine.optimizer.param_groups, (True, False)):
        # The same split as training/trainer.py's build_optimizer: matrices and embeddings decay.
        for name in (n for n in shapes if (len(shapes[n]) >= 2) == decayed):
            optim_sd |= {f"param_groups.{name}.{k}": v for k, v in group.items() if k != "params"}
    return model_sd, optim_sd


def _link_optimizer_state(engine) -> None:
    """Make every parameter's slice of the flat Adam state reachable by name. Adam state appears only
    at the first step: create it (zeros) when a resume comes first. ZeRO-1/2 link parameters to it
    once, after the first step, leaving a group unlinked if its state was not there yet: link all
    groups again (idempotent)."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    opt = engine.optimizer
    zero3 = hasattr(opt, "fp32_partitioned_groups_flat")
    flats = opt.fp32_partitioned_groups_flat if zero3 else opt.single_partition_of_fp32_groups
    for flat in flats:  # Adam state appears at the first step; a resume writes into it before that
        if not opt.optimizer.state.get(flat):
            opt.optimizer.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                         "exp_avg_sq": torch.zeros_like(flat)}
    if not zero3:
        for params, flat in zip(opt.bit16_groups, flats):
            lazy_init_hp_params_optimizer_state(params, flat, opt.optimizer.state)


def load_full_state_dicts(engine, model: torch.nn.Module, checkpoint_id: str) -> None:
    """Read a checkpoint of any layout (by parameter name) into a DeepSpeed engine. Each rank reads
    only its own fragments (the boxes ``full_state_dicts`` writes) of the fp32 master weights and Adam
    moments, from whatever pieces the checkpoint's layout saved, and writes them into the engine's
    partitions; every rank calls this."""
    import torch.distributed.checkpoint as dcp

    _link_optimizer_state(engine)
    layouts = _layouts(model)
    params = dict(model.named_parameters())
    targets = {name: {key: _empty_sharded(layouts[name]) for key in _STATES} for name in params}
    steps = {name: torch.tensor(0.0) for name in params}
    target_model = {name: targets[name][None] for name in params}
    target_optim = {f"state.{name}.step": steps[name] for name in params}
    target_optim |= {f"state.{name}.{key}": targets[name][key] for name in params for key in ADAM_MOMENTS}
    dcp.load({"model": target_model, "optim": target_optim}, checkpoint_id=checkpoint_id)  # in place
    for name, param in params.items():
        numel = local_fragment(param).numel
        for key in _STATES:
            _set_local_state(param, key, _from_sharded(layouts[name], targets[name][key], numel))
    # The loaded fp32 master weights must reach the module's own (partitioned) parameters too.
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        # As DeepSpeed's own checkpoint loading: every parameter back to its partition only, the
        # partitions refreshed, and the small parameters it keeps whole ("persistent") gathered again.
        opt.checkpoint_event_prologue()
        for i in range(len(opt.fp16_groups)):
            opt._reassign_or_swap_out_partitioned_parameters(i)
        opt.checkpoint_event_epilogue()
    elif hasattr(opt, "update_lp_params"):  # ZeRO-1/2
        opt.update_lp_params()
    step = next(iter(steps.values()))
    for state in engine.optimizer.optimizer.state.values():  # the flat fp32 partitions' Adam step counts
        if "step" in state:
            state["step"] = step.clone() if torch.is_tensor(state["step"]) else int(step)
