"""``gptforge generate`` and ``gptforge eval`` (command-table module of ``launcher/cli.py``:
``add_generate_arguments``/``run_generate`` and ``add_eval_arguments``/``run_eval``)."""

from __future__ import annotations

import argparse
import json


def _source(flag: str):
    from .generate import PromptSource

    return lambda value: PromptSource(flag=flag, value=value)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Sample continuations of each prompt from a checkpoint of any parallel layout. A sequence "
                     "ends at <|endoftext|>, after --max-new-tokens, or when prompt plus continuation fill the "
                     "model's context; a prompt that does not leave room for one new token is an error.")
    p.add_argument("checkpoint", help="a step_NNNNNNNN folder, a checkpoints/ folder or a run folder "
                                      "(the newest complete checkpoint in it)")
    p.add_argument("--prompt", dest="prompts", action="append", type=_source("--prompt"), default=[],
                   metavar="TEXT", help="a prompt; repeatable")
    p.add_argument("--prompt-file", dest="prompts", action="append", type=_source("--prompt-file"),
                   metavar="FILE", help="a UTF-8 file whose whole text (less one final newline) is one prompt; "
                                        "repeatable, in order with --prompt")
    p.add_argument("--max-new-tokens", type=int, metavar="N", default=100, help="per sequence (default 100)")
    p.add_argument("--temperature", type=float, metavar="T", default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, metavar="K", default=None,
                   help="sample among the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, metavar="P", default=1.0,
                   help="nucleus sampling: the most likely tokens holding probability P, in (0, 1] (default 1.0)")
    p.add_argument("--num-sequences", type=int, metavar="N", default=1,
                   help="continuations per prompt, one batch (default 1)")
    p.add_argument("--seed", type=int, metavar="S", default=0, help="same seed and flags -> same text (default 0)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per prompt: prompt, prompt_tokens, sequences (text, new_tokens, "
                        "finish_reason)")


def run_generate(args: argparse.Namespace) -> int:
    from .generate import continue_prompts

    continue_prompts(args.checkpoint, args.prompts, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     num_sequences=args.num_sequences, seed=args.seed, device=args.device, as_json=args.json)
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Perplexity on indexed datasets (--data) and GPT-3-style K-shot tasks from JSONL files "
                     "(--task; format: docs/evaluation.md). Results: OUTPUT/eval_results.json, stdout, MLflow.")
    p.add_argument("checkpoint", help="a step_NNNNNNNN folder, a checkpoints/ folder or a run folder "
                                      "(the newest complete checkpoint in it)")
    p.add_argument("--data", action="append", default=[], metavar="PREFIX",
                   help="indexed dataset prefix (PREFIX.bin/.idx/.json from 'gptforge tokenize'); repeatable")
    p.add_argument("--data-split", default=None, metavar="TRAIN,VALID,TEST",
                   help="score only the validation documents of this split (the rule of data.split in "
                        "training); default: every document")
    p.add_argument("--seq-len", type=int, default=None, help="perplexity window (default: the model's context)")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens per --data")
    p.add_argument("--task", dest="tasks", action="append", default=[], metavar="FILE",
                   help="a JSONL task file; repeatable")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 1], metavar="K",
                   help="demonstrations per prompt, one evaluation per value (default: 0 1)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the demonstration draws")
    p.add_argument("--limit", type=int, default=None, help="score at most this many test examples per task")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--output", default=None, help="results folder (default: CHECKPOINT_STEP_FOLDER/eval)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--mlflow-experiment", default="gptforge-eval")


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint

    results = evaluate_checkpoint(args.checkpoint, data=args.data, tasks=args.tasks, data_split=args.data_split,
                                  seq_len=args.seq_len, max_tokens=args.max_tokens, shots=args.shots,
                                  seed=args.seed, limit=args.limit, batch_size=args.batch_size, device=args.device,
                                  output=args.output, mlflow=not args.no_mlflow,
                                  mlflow_experiment=args.mlflow_experiment)
    print(json.dumps(results, indent=2))
    return 0
