"""ZeRO stages 1, 2 and 3 (with optional optimizer CPU offload) through the DeepSpeed engine.

Data parallelism only (tp = pp = 1): the engine owns gradient reduction, partitioning, clipping and
the optimizer step. The step's number of micro-batches follows GPT-3's batch ramp through
``set_train_batch_size``; losses arrive already divided by the global token count, so the engine's own
1/accumulation scaling is off. Checkpoints are gathered to full, named tensors and written with
``torch.distributed.checkpoint`` like every other layout's, so they reshard both ways.
"""

from __future__ import annotations

import torch

from .dims import ParallelDims


def deepspeed_config(*, dims: ParallelDims, micro_batch: int, global_batch: int, precision: str,
                     grad_clip: float) -> dict:
    zero: dict = {"stage": dims.zero_stage}
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


def build_model(config, ds_config: dict, device: torch.device, seed: int) -> torch.nn.Module:
    """The GPT of ``config`` on ``device``, initialised from (seed, parameter name) like every layout."""
    from ..model.gpt import GPT

    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """Wrap ``model`` (initialised, on its device) and ``optimizer`` in a DeepSpeed engine."""
    import deepspeed

    # The process group already exists (gloo or NCCL); DeepSpeed reuses it.
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False,
                               dist_init_required=False)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def set_batch(engine, batch: int) -> None:
    """Sequences in the next step (the batch ramp changes the accumulation count)."""
    if engine.train_batch_size() != batch:
        engine.set_train_batch_size(batch)


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def _full_shape(param: torch.nn.Parameter) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # ZeRO-3 leaves an empty local tensor


def full_state_dicts(engine, model: torch.nn.Module, step: int) -> tuple[dict, dict]:
    """Model and optimizer state keyed by parameter name, in the layout of
    ``torch.distributed.checkpoint.state_dict.get_state_dict`` with ``flatten_optimizer_state_dict``
    ("state.<name>.exp_avg", "param_groups.<name>.lr"; fp32 master weights, Adam moments, step), so a
    DeepSpeed run writes the same checkpoints as every other layout and can reshard to
    and from them. Every rank calls this (gathers are collective under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _link_optimizer_state(engine)
    model_sd, optim_sd = {}, {}
    for name, param in model.named_parameters():
        model_sd[name] = safe_get_full_fp32_param(param).detach().cpu()
        optim_sd[f"state.{name}.step"] = torch.tensor(float(step))
        for key in ("exp_avg", "exp_avg_sq"):
            optim_sd[f"state.{name}.{key}"] = safe_get_full_optimizer_state(param, key).detach().cpu()
    shapes = {n: _full_shape(p) for n, p in model.named_parameters()}
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
    """Read a checkpoint of any layout (by parameter name) into a DeepSpeed engine."""
    import torch.distributed.checkpoint as dcp
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    target_model = {n: torch.empty(_full_shape(p)) for n, p in model.named_parameters()}
    target_state = {n: {"step": torch.tensor(0.0), "exp_avg": torch.empty(_full_shape(p)),
                        "exp_avg_sq": torch.empty(_full_shape(p))} for n, p in model.named_parameters()}
    flat = {f"state.{n}.{k}": v for n, st in target_state.items() for k, v in st.items()}
    dcp.load({"model": target_model, "optim": flat}, checkpoint_id=checkpoint_id)  # fills the tensors in place
    _link_optimizer_state(engine)
    for name, param in model.named_parameters():
        safe_set_full_fp32_param(param, target_model[name])
        safe_set_full_optimizer_state(param, target_state[name]["exp_avg"], "exp_avg")
        safe_set_full_optimizer_state(param, target_state[name]["exp_avg_sq"], "exp_avg_sq")
    # The loaded fp32 master weights must reach the module's own (partitioned) parameters too.
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        for i in range(len(opt.fp16_groups)):
            opt._reassign_or_swap_out_partitioned_parameters(i)
    elif hasattr(opt, "update_lp_params"):  # ZeRO-1/2
        opt.update_lp_params()
    step = next(iter(target_state.values()))["step"]
    for state in engine.optimizer.optimizer.state.values():  # the flat fp32 partitions' Adam step counts
        if "step" in state:
            state["step"] = step.clone() if torch.is_tensor(state["step"]) else int(step)
