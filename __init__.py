"""gptforge: GPT-1/2/3 pretraining, from a filtered web corpus to GPT-3 sizes.

Subpackages, lowest layer first: common (config loader, errors, atomic files, JSON lines, MLflow tracking),
model, parallel, training, evaluation, finetune, interop (Hugging Face), data_prep (corpus, dedup,
tokenization; beside the training stack), launcher (the console script and the shell launchers), configs.
"""

__version__ = "0.1.0"
