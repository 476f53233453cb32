"""EleutherAI's lm-evaluation-harness on a ``gptforge export-hf`` folder, offline, with local tasks: the
documented command of docs/evaluation.md runs, and the harness's per-example log-likelihoods, greedy flags
and accuracies are gptforge's own scores of the same continuations (skipped where ``lm-eval`` is not
installed: ``pip install -e .[test]`` installs it)."""

import glob
import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from gptforge.data_prep.tokenization.tokenizer import Tokenizer
from gptforge.launcher.cli import main as gptforge_main
from gptforge.evaluation.tasks import ChoiceScores, Example, Task, choose, load_task
from gptforge.evaluation.evaluate import score_completions
from gptforge.training.checkpoint import write_model_checkpoint
from gptforge.training.trained_model import load_trained_model
from gptforge.model import build_model, get_preset

pytestmark = pytest.mark.slow

pytest.importorskip("lm_eval")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "evaluation.md")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
TOLERANCE = 1e-4  # nats: the same fp32 computation in another summation order


def doc_block(marker: str) -> str:
    """The fenced block of docs/evaluation.md whose first line starts with ``marker``."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", open(DOC, encoding="utf-8").read(), flags=re.S)
    found = [block for block in blocks if block.startswith(marker)]
    assert len(found) == 1, f"docs/evaluation.md: expected one block starting with {marker!r}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def exported(tokenizer_model, tmp_path_factory):
    """A tiny checkpoint (biases and LayerNorm gains random too, so the choices get distinct scores) and its
    ``gptforge export-hf`` folder."""
    root = tmp_path_factory.mktemp("lm_eval")
    config = get_preset("tiny").config(vocab_size=Tokenizer(tokenizer_model).vocab_size)
    model = build_model(config, seed=3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1.0 * name.endswith("weight") + 0.2 * torch.randn(param.shape, generator=generator))
    checkpoint = write_model_checkpoint(str(root / "ckpt" / "step_00000000"), model.eval(), tokenizer_model, {"step": 0})
    out = str(root / "hf")
    assert gptforge_main(["export-hf", checkpoint, out]) == 0
    return root, checkpoint, out


def greedy_examples(checkpoint: str, contexts: list[str], steps: int = 3) -> list[Example]:
    """Continuations that the model's greedy decoding produces after ``contexts`` (whose tokens are the same
    however the text is split), so that the greedy check is compared where it holds too."""
    trained = load_trained_model(checkpoint)
    tok = Tokenizer(trained.tokenizer_path)
    found = []
    for context in contexts:
        ids = tok.encode(context)
        with torch.no_grad():
            for _ in range(steps):
                ids.append(int(trained.model(torch.tensor([ids]))[0, -1, : tok.vocab_size].argmax()))
        text = tok.decode(ids)
        if not text.startswith(context):
            continue
        continuation = text[len(context):]
        if continuation.strip() and tok.encode(context) + tok.encode(continuation) == tok.encode(text) == ids:
            found.append(Example(context=context, choices=[continuation], answer=0, line=0))
    assert found, "no greedy continuation survives a round trip through the tokenizer"
    return found


def write_local_tasks(root, checkpoint: str) -> dict[str, Task]:
    """The shipped example tasks' test splits as harness tasks: a YAML each (from the documented example)
    over a local JSONL file with ``context``, ``choices`` and ``answer`` per line. The LAMBADA-style task
    also gets the model's own greedy continuations of its passages."""
    include = root / "tasks"
    include.mkdir()
    template = doc_block("task: ")
    tasks = {}
    for source, name, kind in (("choice-example.jsonl", "gptforge_choice", "multiple_choice"),
                               ("lambada-example.jsonl", "gptforge_lambada", "loglikelihood")):
        task = load_task(os.path.join(REPO, "configs", "eval", source))
        if kind == "loglikelihood":
            task = replace(task, test=task.test + greedy_examples(checkpoint, [x.context for x in task.test]))
        data = include / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"context": x.context, "choices": x.choices, "answer": x.answer}) + "\n"
                                for x in task.test), encoding="utf-8")
        text = template.replace("my_local_task", name).replace("/data/my_task.jsonl", str(data))
        if kind == "loglikelihood":  # one continuation: its log-likelihood and whether greedy decoding gives it
            text = (text.replace("output_type: multiple_choice", "output_type: loglikelihood")
                    .replace("doc_to_choice: \"{{choices}}\"\n", "")
                    .replace("doc_to_target: answer", "doc_to_target: \"{{choices[0]}}\"")
                    .replace("metric: acc\n", "metric: perplexity\n    aggregation: perplexity\n"
                                             "    higher_is_better: false\n  - metric: acc\n"))
        (include / f"{name}.yaml").write_text(text, encoding="utf-8")
        tasks[name] = task
    return tasks


def test_harness_scores_the_export_like_gptforge(exported):
    root, checkpoint, out = exported
    tasks = write_local_tasks(root, checkpoint)
    env_line, command = doc_block("export HF_HUB_OFFLINE=1").strip().splitlines()
    offline = dict(item.split("=") for item in env_line.split()[1:])
    assert offline == {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    argv = shlex.split(command.replace("EXPORT_DIR", out).replace("TASK_DIR", str(root / "tasks"))
                       .replace("my_local_task", " ".join(tasks)))
    assert argv[:2] == ["lm_eval", "run"]
    done = subprocess.run([sys.executable, "-m", "lm_eval", *argv[1:]], capture_output=True, text=True,
                          env={**os.environ, **OFFLINE, **offline}, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    trained = load_trained_model(checkpoint)
    tok = Tokenizer(trained.tokenizer_path)
    results = json.load(open(glob.glob(os.path.join(out, "lm_eval", "**", "results_*.json"), recursive=True)[0]))
    for name, task in tasks.items():
        [samples_path] = glob.glob(os.path.join(out, "lm_eval", "**", f"samples_{name}_*.jsonl"), recursive=True)
        samples = sorted((json.loads(line) for line in open(samples_path, encoding="utf-8")),
                         key=lambda s: s["doc_id"])
        assert len(samples) == len(task.test)
        # gptforge eval's requests at 0 shots without a description: (prompt tokens, completion tokens)
        requests = [(tok.encode(x.context), tok.encode(c)) for x in task.test for c in x.choices]
        with torch.no_grad():
            ours = score_completions(trained.model, requests, vocab_size=tok.vocab_size, batch_size=8,
                                     device=torch.device("cpu"))
        theirs = [(float(loglik), greedy == "True") for s in samples for [[loglik, greedy]] in s["resps"]]
        assert [s["doc"]["context"] for s in samples] == [x.context for x in task.test]
        assert len(theirs) == len(ours)
        for (their_loglik, their_greedy), (our_loglik, _, our_greedy), (prompt, completion) in zip(
                theirs, ours, requests):
            assert their_loglik == pytest.approx(our_loglik, abs=TOLERANCE), (name, tok.decode(prompt + completion))
            assert their_greedy == our_greedy, (name, tok.decode(prompt + completion))
        metrics = results["results"][name]
        if task.type == "multiple_choice":
            offset, correct = 0, 0
            for x in task.test:
                rows = ours[offset : offset + len(x.choices)]
                offset += len(x.choices)
                correct += choose(ChoiceScores(loglik=[r[0] for r in rows], tokens=[r[1] for r in rows]))[
                    "total"] == x.answer
            assert metrics["acc,none"] == pytest.approx(correct / len(task.test))
        else:
            assert metrics["acc,none"] == pytest.approx(sum(g for _, _, g in ours) / len(ours))
            # the harness's perplexity is per example: exp of minus the mean log-likelihood of a continuation
            assert metrics["perplexity,none"] == pytest.approx(
                math.exp(-sum(ll for ll, _, _ in ours) / len(ours)), rel=1e-5)
            greedy_hits = sum(g for _, _, g in ours)
            assert 0 < greedy_hits < len(ours)  # both outcomes of the greedy check were compared


def test_every_documented_lm_eval_command_uses_flags_of_the_installed_harness():
    """The standard-benchmark command of docs/evaluation.md cannot run offline here; its flags at least
    exist in the installed harness."""
    commands = [line for line in open(DOC, encoding="utf-8").read().splitlines() if line.startswith("lm_eval run ")]
    assert len(commands) == 2
    usage = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--help"], capture_output=True, text=True,
                           env={**os.environ, **OFFLINE}, timeout=120).stdout
    for command in commands:
        for flag in re.findall(r"(--[a-z_]+)", command):
            assert re.search(rf"{flag}\b", usage), f"lm_eval run has no {flag}"
