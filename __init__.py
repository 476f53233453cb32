"""gptforge: GPT-1/2/3 pretraining. Subpackages: model, parallel, data_prep, launcher, configs."""

__version__ = "0.1.0"
