"""Real text every machine with Python has (docstrings of the standard library; PSF License) and the
tiny training config the tests start from."""

from __future__ import annotations

from gptforge.data_prep.readers.text_files import stdlib_docstrings  # noqa: F401 (the tests' corpus)


def base_config(run_dir, tokenizer_model: str, indexed_prefix: str) -> dict:
    return {
        "run": {"dir": str(run_dir)},
        "model": {"preset": "tiny"},
        "tokenizer": {"path": tokenizer_model},
        "data": {"sources": [{"path": indexed_prefix, "weight": 1.0}], "split": "90,10,0", "seed": 7},
        "train": {"max_steps": 8, "global_batch_size": 4, "micro_batch_size": 2, "seq_len": 32,
                  "log_interval": 1, "eval_interval": 4, "eval_samples": 8, "seed": 3},
        "optim": {"lr": 3e-3, "warmup_tokens": 256, "decay_tokens": 2048},
        "checkpoint": {"interval": 4, "keep_last": 2},
        "mlflow": {"enabled": False},
    }
