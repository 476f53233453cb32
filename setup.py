"""gptforge: distributed GPT pretraining, from a filtered web corpus to GPT-3 sizes.

One import root, ``gptforge``: the top-level folders of this repository are its subpackages
(``gptforge.model`` is ``model/``, ``gptforge.training.trainer`` is ``training/trainer.py`` ...). Inside
the package every import is relative, so a checkout reads the same without an install. Nothing generic such as
``model`` is ever installed as a top-level module.
"""

from setuptools import find_packages, setup

# The concerns, lowest layer first (tests/test_layering.py enforces who may import whom).
TOP_LEVEL = ["common", "model", "parallel", "training", "evaluation", "finetune", "interop", "data_prep",
             "launcher", "configs"]
SUBPACKAGES = [name for top in TOP_LEVEL for name in [top] + [f"{top}.{sub}" for sub in find_packages(top)]]

setup(
    name="gptforge",
    version="0.1.0",
    description="Distributed GPT-1/2/3 pretraining: data, tensor/pipeline/ZeRO parallelism, SLURM, MLflow",
    python_requires=">=3.10",
    packages=["gptforge"] + [f"gptforge.{name}" for name in SUBPACKAGES],
    # The repository root is the ``gptforge`` package (its __init__.py); setuptools never packs setup.py.
    package_dir={"gptforge": "."},
    package_data={"gptforge.configs": ["*.yaml", "data/*.yaml", "data/*.txt"], "gptforge.launcher": ["*.sh"]},
    install_requires=[
        # Lower bounds that the CPU build of torch 2.13.0 satisfies; see README for the CPU install.
        "torch>=2.6",
        "deepspeed>=0.16",
        "megatron-core>=0.12",
        "sentencepiece>=0.2",
        "datasets>=3.0",
        "mlflow>=2.20",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "pyarrow>=15",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "safetensors>=0.4",
        "transformers>=4.45",
        "tokenizers>=0.20",  # GPT-2 byte-level BPE, and tokenizer.json exports of SentencePiece models
        # data_prep: WARC reading and HTML extraction (offline), .zst shards, the quality
        # classifier, fast non-cryptographic hashing for MinHash and exact dedup
        "resiliparse>=0.15",
        "zstandard>=0.22",
        "scikit-learn>=1.4",
        "xxhash>=3.4",
        "py3langid>=0.3",  # language ID with a bundled model and probability scores
    ],
    extras_require={"test": ["pytest>=8", "hypothesis>=6.100",
                             # runs the evaluation harness on exported folders (tests/test_lm_eval_harness.py)
                             "lm-eval[hf]>=0.4.13"],
                    # bench/ only: the reference implementation the dedup benchmark runs beside ours
                    "bench": ["datasketch>=1.6"]},
    entry_points={"console_scripts": ["gptforge=gptforge.launcher.cli:main"]},
)
