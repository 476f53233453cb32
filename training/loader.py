"""The micro-batches of each step, read ahead of the loop by a background thread.

Which samples a step reads is fixed by the data position alone: the step at data position ``start``
(samples consumed) and tokens seen ``tokens`` reads samples ``[start, start + batch)``, ``batch`` being the
schedule's batch size at ``tokens``, and the next step starts at ``start + batch``. So the reader can walk
the same positions ahead of the loop: while the GPU runs step k it reads, stacks and (on CUDA) pins the
samples of steps k+1 ... k+depth, and the loop only starts their host-to-device copies
(``non_blocking``, from pinned memory, so they overlap the GPU's work). A resumed run starts the
reader at the checkpoint's position, so it reads exactly what the uninterrupted run read; a request at
any other position than the next one read ahead (nothing in training asks for one) restarts it there.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch

KEYS = ("tokens", "labels", "loss_mask")


def micro_batches(dataset, start: int, batch: int, micro: int, dp_rank: int, dp_size: int) -> list[dict]:
    """This data-parallel rank's micro-batches of the global batch of samples [start, start + batch),
    each ``{tokens, labels, loss_mask}`` of shape [micro, T]."""
    per_rank = batch // dp_size
    first = start + dp_rank * per_rank
    out = []
    for m in range(per_rank // micro):
        items = [dataset[first + m * micro + j] for j in range(micro)]
        out.append({k: torch.stack([it[k] for it in items]) for k in KEYS})
    return out


@dataclass(kw_only=True)
class StepBatch:
    start: int
    """Data position of the step's first sample (of the global batch)."""
    batch: int
    """Global batch size of the step (sequences)."""
    micro_batches: list[dict]
    """This rank's micro-batches, on the training device once ``BatchLoader.next`` returned them."""
    local_tokens: torch.Tensor
    """Loss tokens in this rank's micro-batches (the sum of their loss masks, counted on the host), a 0-dim
    float64 tensor on the device: a plain host number would be copied with a synchronising copy."""


class BatchLoader:
    """``next(start, tokens)`` returns the step's ``StepBatch`` with its tensors on ``device``; up to ``depth``
    steps are read ahead in a background thread. ``batch_size(tokens)`` is the schedule's batch size."""

    def __init__(self, dataset, *, batch_size, seq_len: int, micro: int, dp_rank: int, dp_size: int,
                 device: torch.device, depth: int = 2) -> None:
        self.dataset, self.batch_size, self.seq_len = dataset, batch_size, seq_len
        self.micro, self.dp_rank, self.dp_size = micro, dp_rank, dp_size
        self.device, self.depth = device, depth
        self.pin = device.type == "cuda"
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._next: tuple[int, int] | None = None
        """(start, tokens) the reader will hand out next."""

    def _read(self, start: int, tokens: int) -> StepBatch:
        batch = self.batch_size(tokens)
        mbs = micro_batches(self.dataset, start, batch, self.micro, self.dp_rank, self.dp_size)
        local_tokens = torch.tensor(float(sum(float(mb["loss_mask"].sum()) for mb in mbs)), dtype=torch.float64)
        if self.pin:
            mbs = [{k: v.pin_memory() for k, v in mb.items()} for mb in mbs]
            local_tokens = local_tokens.pin_memory()
        return StepBatch(start=start, batch=batch, micro_batches=mbs, local_tokens=local_tokens)

    def _run(self, start: int, tokens: int, out: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> None:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        try:
            while not stop.is_set():
                item = self._read(start, tokens)
                put(item)
                start, tokens = start + item.batch, tokens + item.batch * self.seq_len
        except BaseException as err:  # handed to the loop, which raises it with the reader's traceback
            put(err)

    def _start(self, start: int, tokens: int) -> None:
        self.close()
        self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start, tokens, self._queue, self._stop),
                                        name="gptforge-batch-reader", daemon=True)
        self._thread.start()
        self._next = (start, tokens)

    def next(self, start: int, tokens: int) -> StepBatch:
        """The batch of the step at data position ``start`` with ``tokens`` seen, on the device."""
        if self._next != (start, tokens):
            self._start(start, tokens)
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        self._next = (start + item.batch, tokens + item.batch * self.seq_len)
        item.micro_batches = [{k: v.to(self.device, non_blocking=self.pin) for k, v in mb.items()}
                              for mb in item.micro_batches]
        item.local_tokens = item.local_tokens.to(self.device, non_blocking=self.pin)
        return item

    def close(self) -> None:
        """Stop the reader (it finishes the sample it is reading)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread = self._queue = self._stop = None
        self._next = None
