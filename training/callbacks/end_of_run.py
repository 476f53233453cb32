"""At the end of a run: a text sample from the trained model, and the loss-curve plot."""

from __future__ import annotations

import os

import torch

from ...model.sample import sample
from ...parallel.loss import inference_forward
from ..metrics import plot_loss_curve
from .base import Callback


class Sample(Callback):
    """``train.sample_tokens`` tokens after ``train.sample_prompt``, once the last step is done; printed
    and kept in the summary."""

    def on_train_end(self, trainer, summary: dict) -> None:
        t = trainer.t
        if trainer.state.step != t.max_steps or t.sample_tokens <= 0:
            return
        from ...data_prep.tokenization.tokenizer import Tokenizer

        # Every rank samples the same tokens (same seed): sharded forwards need all of them.
        tok = Tokenizer(trainer.cfg.tokenizer.path)
        prompt = tok.encode(t.sample_prompt) if t.sample_prompt else [tok.eod]
        out = sample(trainer.model, prompt, max_new_tokens=t.sample_tokens, temperature=0.8, top_k=40,
                     forward=inference_forward(trainer.module, trainer.dims),
                     generator=torch.Generator(device=trainer.info.device).manual_seed(t.seed))
        summary["sample"] = t.sample_prompt + tok.decode([i for i in out if i != tok.eod])
        trainer.log("sample:\n" + summary["sample"])


class LossCurvePlot(Callback):
    """``<run.dir>/loss_curve.png`` from ``metrics.jsonl`` (rank 0); offered to the tracker as ``plots``."""

    def on_train_end(self, trainer, summary: dict) -> None:
        run_dir = trainer.cfg.run.dir
        png = plot_loss_curve(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "loss_curve.png"))
        if png:
            trainer.artifacts["plots"] = png
