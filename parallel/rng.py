"""Dropout that is right under tensor and sequence parallelism: a second, model-parallel generator
(the idea of Megatron-LM's ``CudaRNGStatesTracker``, for any device).

Dropout on an activation every tensor-parallel rank holds whole (the residual stream without sequence
parallelism, the summed embeddings) must draw the same mask on every rank, or the replicas drift apart:
it uses the default generator, which the trainer seeds the same on every rank and every rank advances
alike. Dropout on an activation split over the tensor-parallel ranks must draw a different mask on
each rank, or every shard repeats the others' mask: the attention probabilities (each rank holds some
of the heads) and, with sequence parallelism, the residual dropout (each rank holds some of the
positions). Those draw from a ``ModelParallelRNG``, seeded by (seed, tensor-parallel rank,
pipeline rank). ``F.dropout`` and ``F.scaled_dot_product_attention`` take no generator, so ``fork``
swaps this state into the default generator of the activations' device for the duration of the call,
then swaps it back out, leaving the default generator as it was.

A block recomputed by activation checkpointing must redraw the masks of its forward:
``torch.utils.checkpoint`` restores the default generator itself, and ``checkpoint_contexts`` (its
``context_fn``) restores this one. The state belongs in a checkpoint next to the default generator's
(``state_dict``/``load_state_dict``), for an exact resume.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

MODEL_PARALLEL_SEED_OFFSET = 2718
"""Keeps the model-parallel streams apart from the default generator's (Megatron-LM uses the same offset)."""


def model_parallel_seed(seed: int, tp_rank: int, pp_rank: int = 0) -> int:
    """The model-parallel generator's seed: distinct for every (tensor-parallel, pipeline) rank, so
    shards and stages draw independent masks; equal over data-parallel replicas, as the default
    generator is. The multiplier keeps (seed, rank) pairs of different seeds from colliding."""
    return (seed * 1_000_003 + MODEL_PARALLEL_SEED_OFFSET + tp_rank + 1_009 * pp_rank) % (2**63)


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def _set_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)


class ModelParallelRNG:
    """The generator state for dropout on activations sharded over tensor-parallel ranks, on ``device``
    (the device the activations, and so the dropout kernels, run on)."""

    def __init__(self, *, seed: int, tp_rank: int, pp_rank: int = 0, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type != "cpu" and self.device.index is None:  # the generator of one device
            self.device = torch.device(self.device.type, torch.get_device_module(self.device.type).current_device())
        self.seed = model_parallel_seed(seed, tp_rank, pp_rank)
        self._state = torch.Generator(device=self.device).manual_seed(self.seed).get_state()
        self._forked = False

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """Random ops on ``device`` inside draw from this generator; the default generator is untouched.
        Nested forks are one fork (the outer one already made this state current)."""
        if self._forked:
            yield
            return
        outer = _get_state(self.device)
        _set_state(self._state, self.device)
        self._forked = True
        try:
            yield
        finally:
            self._forked = False
            self._state = _get_state(self.device)
            _set_state(outer, self.device)

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``context_fn`` for non-reentrant ``torch.utils.checkpoint``: the first context wraps a block's
        forward and notes this generator's state at its start; the second wraps the recomputation in
        backward, which starts from that state (so it draws the forward's masks) and leaves the
        generator where it was (later blocks' forwards have moved it on since)."""
        start: dict[str, torch.Tensor] = {}

        @contextlib.contextmanager
        def forward() -> Iterator[None]:
            start["state"] = self._state
            yield

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            current = self._state
            self._state = start["state"]
            try:
                yield
            finally:
                self._state = current

        return forward(), recompute()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "device_type": self.device.type, "state": self._state.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream saved by ``state_dict`` (a checkpoint of the same rank)."""
        if state["device_type"] != self.device.type:
            raise ValueError(f"model-parallel RNG state saved on {state['device_type']!r} cannot continue on "
                             f"{self.device.type!r} (generator states differ by device type)")
        self.seed = int(state["seed"])
        self._state = state["state"].clone()


_CURRENT: ModelParallelRNG | None = None


def model_parallel_rng() -> ModelParallelRNG | None:
    """The process's model-parallel generator, installed by ``gptforge.parallel.apply.parallelize``
    when the model has dropout on tensor-parallel shards; None otherwise (all dropout then draws from
    the default generator). Process-wide, like the default generator it complements."""
    return _CURRENT


def set_model_parallel_rng(rng: ModelParallelRNG | None) -> None:
    global _CURRENT
    _CURRENT = rng
