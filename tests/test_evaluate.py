"""``gptforge eval``: K-shot prompts, scoring rules on constructed logits, perplexity against an independent
computation, task-file errors, and the whole command on a tiny checkpoint (JSON + MLflow)."""

import argparse
import json
import math
import os

import numpy as np
import pytest
import torch

from gptforge.evaluation.tasks import (ChoiceScores, Example, Task, TaskFileError, build_prompt, choose,
                                          completion_logprobs, fit_prompt, load_task, perplexity,
                                          sample_demonstrations)
from gptforge.evaluation import cli as eval_cli
from gptforge.evaluation.evaluate import document_range
from gptforge.training.checkpoint import write_model_checkpoint
from gptforge.model import build_model, get_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAMBADA = os.path.join(REPO, "configs", "eval", "lambada-example.jsonl")
CHOICE = os.path.join(REPO, "configs", "eval", "choice-example.jsonl")


def run_eval(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    eval_cli.add_eval_arguments(parser)
    return eval_cli.run_eval(parser.parse_args(list(argv)))


@pytest.fixture(scope="module")
def checkpoint(tokenizer_model, tmp_path_factory) -> str:
    from gptforge.data_prep.tokenization.tokenizer import Tokenizer

    config = get_preset("tiny").config(vocab_size=Tokenizer(tokenizer_model).vocab_size)
    path = str(tmp_path_factory.mktemp("ckpt") / "step_00000000")
    return write_model_checkpoint(path, build_model(config, seed=5).eval(), tokenizer_model, {"step": 0})


def example(context: str, answer: str) -> Example:
    return Example(context=context, choices=[answer], answer=0, line=0)


# ------------------------------------------------------------------------------------------ prompts


def test_prompt_is_description_demonstrations_query_joined_by_the_separator():
    demos = [example("Q: 1+1?\nA:", " 2").demonstration(), example("Q: 2+2?\nA:", " 4").demonstration()]
    assert build_prompt("Add.", demos, "Q: 3+3?\nA:", "\n\n") == "Add.\n\nQ: 1+1?\nA: 2\n\nQ: 2+2?\nA: 4\n\nQ: 3+3?\nA:"
    assert build_prompt("", [], "Q: 3+3?\nA:", "\n\n") == "Q: 3+3?\nA:"  # zero-shot, no description


def test_demonstrations_are_a_seeded_draw_without_replacement():
    train = [example(f"c{i}", f" a{i}") for i in range(10)]
    first = sample_demonstrations(train, 4, seed=1, query_index=0)
    assert first == sample_demonstrations(train, 4, seed=1, query_index=0)
    assert len({id(x) for x in first}) == 4
    assert first != sample_demonstrations(train, 4, seed=2, query_index=0)
    assert first != sample_demonstrations(train, 4, seed=1, query_index=1)
    assert sorted(x.context for x in sample_demonstrations(train, 10, seed=3, query_index=0)) == sorted(
        x.context for x in train)
    with pytest.raises(ValueError, match="--shots 11: the task has only 10 training examples"):
        sample_demonstrations(train, 11, seed=1, query_index=0)


def test_demonstrations_that_do_not_fit_are_dropped_last_first_and_the_query_is_cut_from_the_left():
    encode = lambda text: list(text.encode())  # one token per byte: lengths are exact  # noqa: E731
    task = Task(name="t", type="lambada", path="t.jsonl", description="D", separator="|")
    demos = [example("aaaa", " b"), example("cccc", " d")]
    query = example("qq", " xyz")  # longest completion: 4 tokens
    # "D|aaaa b|cccc d|qq" = 18 tokens + 4 for the completion
    fitted = fit_prompt(encode, task, demos, query, context_length=22)
    assert (bytes(fitted.tokens).decode(), fitted.kept, fitted.dropped) == ("D|aaaa b|cccc d|qq", 2, 0)
    fitted = fit_prompt(encode, task, demos, query, context_length=21)
    assert (bytes(fitted.tokens).decode(), fitted.kept, fitted.dropped) == ("D|aaaa b|qq", 1, 1)
    fitted = fit_prompt(encode, task, demos, query, context_length=9)
    assert (bytes(fitted.tokens).decode(), fitted.kept, fitted.dropped, fitted.truncated) == ("D|qq", 0, 2, False)
    fitted = fit_prompt(encode, task, demos, query, context_length=6)
    assert (bytes(fitted.tokens).decode(), fitted.truncated) == ("qq", True)


# ------------------------------------------------------------------------------------------ scoring


def test_completion_logprobs_and_greedy_match_on_constructed_logits():
    vocab = 4  # one padding column (index 4) with the largest logit: it must not count
    tokens = torch.tensor([0, 1, 2, 3])
    logits = torch.full((4, 5), -5.0)
    logits[:, 4] = 50.0
    logits[0, 1] = 2.0  # predicts token 1 at position 1: not part of the completion
    logits[1, 2] = 3.0  # position 2 gets token 2: greedy hit
    logits[2, 0] = 4.0  # position 3 should be token 3, but token 0 is the argmax: greedy miss
    logits[2, 3] = 1.0
    logprobs, greedy = completion_logprobs(logits, tokens, 2, vocab)
    want = [3.0 - math.log(math.exp(3.0) + 3 * math.exp(-5.0)),
            1.0 - math.log(math.exp(4.0) + math.exp(1.0) + 2 * math.exp(-5.0))]
    torch.testing.assert_close(logprobs, torch.tensor(want))
    assert greedy is False
    logits[2, 3] = 6.0
    assert completion_logprobs(logits, tokens, 2, vocab)[1] is True  # every target token is the argmax
    assert perplexity(-float(completion_logprobs(logits, tokens, 2, vocab)[0].sum()), 2) == pytest.approx(
        math.exp(-float(completion_logprobs(logits, tokens, 2, vocab)[0].mean())))


def test_multiple_choice_rules_total_per_token_and_unconditional():
    # choice 0: short and likely in total; choice 1: long, best per token; choice 2: likely a priori anyway
    scores = ChoiceScores(loglik=[-3.0, -4.0, -3.5], tokens=[1, 4, 2], unconditional=[-1.0, -3.0, -9.0])
    assert choose(scores) == {"total": 0, "per_token": 1, "unconditional": 2}
    assert "unconditional" not in choose(ChoiceScores(loglik=[-1.0, -2.0], tokens=[1, 1]))


# ------------------------------------------------------------------------------------------ task files


def write_lines(path, *objects) -> str:
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return str(path)


@pytest.mark.parametrize("row, message", [
    ({"split": "test", "choices": [" a", " b"], "answer": 0}, "line 3: missing field 'context'"),
    ({"split": "test", "context": "Q", "choices": [" a", " b"]}, "line 3: missing field 'answer'"),
    ({"split": "dev", "context": "Q", "choices": [" a", " b"], "answer": 0}, "line 3: field 'split' must be"),
    ({"split": "test", "context": "Q", "choices": [" a", " b"], "answer": 2}, "line 3: field 'answer' must index"),
    ({"split": "test", "context": "Q", "choices": [" a"], "answer": 0}, "line 3: field 'choices' must be a list"),
    ({"split": "test", "context": "Q", "choices": [" a", " b"], "answer": 0, "labl": 1}, "line 3: unknown field"),
])
def test_task_file_errors_name_file_line_and_field(tmp_path, row, message):
    header = {"task": "t", "type": "multiple_choice"}
    path = write_lines(tmp_path / "t.jsonl", header, {"split": "train", "context": "Q", "choices": [" a", " b"],
                                                      "answer": 1}, row)
    with pytest.raises(TaskFileError, match=f"{path} {message}"):
        load_task(path)


def test_task_header_and_lambada_errors(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", {"type": "lambada"})
    with pytest.raises(TaskFileError, match=f"{path} line 1 \\(header\\): missing field 'task'"):
        load_task(path)
    path = write_lines(tmp_path / "b.jsonl", {"task": "x", "type": "lambada"}, {"split": "test"})
    with pytest.raises(TaskFileError, match=f"{path} line 2: missing field 'text'"):
        load_task(path)
    path = write_lines(tmp_path / "c.jsonl", {"task": "x", "type": "lambada"}, {"split": "test", "text": "word"})
    with pytest.raises(TaskFileError, match=f"{path} line 2: field 'text' needs a context and a last word"):
        load_task(path)


def test_shipped_tasks_load_with_both_splits():
    lam, mc = load_task(LAMBADA), load_task(CHOICE)
    assert (lam.type, len(lam.train) >= 16, len(lam.test) >= 10) == ("lambada", True, True)
    assert lam.test[0].choices == [" cake"] and lam.test[0].context.endswith("the birthday")
    assert (mc.type, mc.unconditional_prefix, len(mc.train) >= 16, len(mc.test) >= 10) == (
        "multiple_choice", "Answer: ", True, True)


# ------------------------------------------------------------------------------------------ command


def test_perplexity_equals_exp_of_independently_computed_mean_token_loss(checkpoint, indexed_prefix, tmp_path):
    from gptforge.training.data import import_megatron_datasets
    from gptforge.training.trained_model import load_trained_model

    out = tmp_path / "out"
    assert run_eval(checkpoint, "--data", indexed_prefix, "--max-tokens", "300", "--seq-len", "32",
                    "--batch-size", "3", "--output", str(out), "--no-mlflow") == 0
    row = json.loads((out / "eval_results.json").read_text())["perplexity"][indexed_prefix]

    _, _, indexed_dataset = import_megatron_datasets()
    index = indexed_dataset.IndexedDataset(indexed_prefix, mmap=True)
    stream = np.concatenate([np.asarray(index[i], dtype=np.int64) for i in range(len(index))])[:300]
    model = load_trained_model(checkpoint).model
    nll = []
    with torch.no_grad():  # one window at a time, log-softmax and gather by hand
        for start in range(0, 299, 32):
            window = torch.from_numpy(stream[start : min(start + 33, 300)])
            logprobs = torch.log_softmax(model(window[None, :-1])[0].double(), dim=-1)
            nll.extend((-logprobs.gather(1, window[1:, None])[:, 0]).tolist())
    assert row["tokens"] == 299 == len(nll)
    assert row["mean_loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert row["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert document_range(1000, "969,30,1") == (969, 999) and document_range(7, None) == (0, 7)


def test_eval_end_to_end_json_stdout_and_mlflow(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    assert run_eval(checkpoint, "--task", LAMBADA, "--task", CHOICE, "--shots", "0", "3", "--limit", "6",
                    "--output", str(out)) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "eval_results.json").read_text())
    assert printed == saved and saved["step"] == 0 and saved["mlflow_run_id"]
    lam = saved["tasks"]["lambada-example"]["shots"]
    assert set(lam) == {"0", "3"} and lam["0"]["examples"] == 6 and lam["0"]["demonstrations_mean"] == 0
    assert 0 <= lam["3"]["accuracy"] <= 1 and lam["3"]["perplexity"] > 1 and lam["3"]["target_tokens"] >= 6
    # Three passages and the description do not fit the tiny model's 128 tokens: dropped and reported.
    assert lam["3"]["demonstrations_dropped"] > 0 and lam["3"]["demonstrations_mean"] < 3
    assert any(note.startswith("3-shot:") for note in saved["tasks"]["lambada-example"]["notes"])
    mc = saved["tasks"]["choice-example"]["shots"]["3"]
    assert {"accuracy", "accuracy_per_token", "accuracy_unconditional"} <= set(mc)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="sqlite:///" + str(out / "mlflow.db"))
    run = client.get_run(saved["mlflow_run_id"])
    assert run.data.metrics["lambada-example/3shot/accuracy"] == pytest.approx(lam["3"]["accuracy"])


def test_flag_errors_come_before_the_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="give at least one --data PREFIX or --task FILE"):
        run_eval(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--shots 99: .*lambada-example.jsonl has only 20 training examples"):
        run_eval(str(tmp_path / "missing"), "--task", LAMBADA, "--shots", "99")
