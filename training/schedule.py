"""GPT-3's schedules (Appendix B), both driven by tokens seen, not steps.

- learning rate: linear warmup over ``warmup_tokens``, cosine decay to ``min_lr_ratio`` x peak at
  ``decay_tokens``, constant afterwards;
- batch size: linear ramp from ``ramp_start_tokens`` to the full batch over ``ramp_tokens``, in whole
  multiples of (micro batch x data-parallel ranks) so every rank runs the same number of micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(kw_only=True, frozen=True)
class TokenSchedule:
    peak_lr: float
    min_lr_ratio: float
    warmup_tokens: int
    decay_tokens: int
    seq_len: int
    full_batch: int
    """Sequences per step at full batch."""
    batch_multiple: int
    """micro_batch_size x data-parallel size: every batch is a multiple of it."""
    ramp_start_tokens: int = 0
    ramp_tokens: int = 0

    def lr(self, tokens_after_step: int) -> float:
        """Learning rate of the step that ends with ``tokens_after_step`` tokens seen (so step 1 is not 0)."""
        t = tokens_after_step
        if self.warmup_tokens > 0 and t < self.warmup_tokens:
            return self.peak_lr * t / self.warmup_tokens
        min_lr = self.peak_lr * self.min_lr_ratio
        span = self.decay_tokens - self.warmup_tokens
        progress = 1.0 if span <= 0 else min(1.0, (t - self.warmup_tokens) / span)
        return min_lr + (self.peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def batch_size(self, tokens_seen: int) -> int:
        """Sequences in the next step, given the tokens seen before it."""
        if self.ramp_tokens <= 0:
            return self.full_batch
        start = self.ramp_start_tokens / self.seq_len
        frac = min(1.0, tokens_seen / self.ramp_tokens)
        seqs = start + (self.full_batch - start) * frac
        seqs = int(seqs // self.batch_multiple) * self.batch_multiple
        return max(self.batch_multiple, min(self.full_batch, seqs))

    def samples_for_steps(self, steps: int, tokens_seen: int = 0) -> int:
        """Sequences consumed by ``steps`` steps starting at ``tokens_seen``."""
        total = 0
        for _ in range(steps):
            batch = self.batch_size(tokens_seen)
            total += batch
            tokens_seen += batch * self.seq_len
        return total

    def validate(self) -> list[str]:
        errors = []
        if self.full_batch % self.batch_multiple:
            errors.append(
                f"train.global_batch_size ({self.full_batch}) must be a multiple of train.micro_batch_size x "
                f"data-parallel ranks ({self.batch_multiple})"
            )
        if self.peak_lr <= 0:
            errors.append(f"optim.lr must be > 0, got {self.peak_lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            errors.append(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_tokens < 0 or self.decay_tokens < 0 or self.ramp_tokens < 0 or self.ramp_start_tokens < 0:
            errors.append("optim.warmup_tokens, decay_tokens, batch_ramp_tokens and batch_ramp_start_tokens must be >= 0")
        if self.decay_tokens < self.warmup_tokens:
            errors.append(f"optim.decay_tokens ({self.decay_tokens}) must be >= optim.warmup_tokens ({self.warmup_tokens})")
        return errors
