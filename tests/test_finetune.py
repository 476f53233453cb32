"""``gptforge finetune``: GPT-1 input layouts, the classifier wrapper, data-field errors, config errors, and
fine-tuning runs on a synthetic task that must beat chance with the auxiliary LM loss on and off."""

import argparse
import json
import random

import pytest
import torch
import yaml

from gptforge.common.config import ConfigError
from gptforge.finetune import cli as finetune_cli
from gptforge.finetune.finetune import (GPTClassifier, extend_vocabulary, lm_loss,
                                        load_finetuned)
from gptforge.finetune.data import FinetuneTaskConfig, SpecialTokens, load_examples, transform
from gptforge.model import build_model, get_preset
from gptforge.training.checkpoint import write_model_checkpoint

S = SpecialTokens(start=900, delimiter=901, extract=902)


def run_finetune(config: str, *overrides: str) -> int:
    parser = argparse.ArgumentParser()
    finetune_cli.add_arguments(parser)
    return finetune_cli.run(parser.parse_args(["--config", config, *overrides]))


# ------------------------------------------------------------------------------------------ layouts


def test_each_input_transformation_exact_token_layout():
    assert transform("classification", [[1, 2, 3]], S, 16) == ([[900, 1, 2, 3, 902]], False)
    assert transform("entailment", [[1, 2], [3]], S, 16) == ([[900, 1, 2, 901, 3, 902]], False)
    assert transform("similarity", [[1, 2], [3]], S, 16) == ([[900, 1, 2, 901, 3, 902], [900, 3, 901, 1, 2, 902]],
                                                            False)
    assert transform("multiple_choice", [[1, 2], [5], [6, 7]], S, 16) == (
        [[900, 1, 2, 901, 5, 902], [900, 1, 2, 901, 6, 7, 902]], False)


def test_long_inputs_lose_the_end_of_their_longest_segment():
    assert transform("classification", [[1, 2, 3, 4, 5]], S, 5) == ([[900, 1, 2, 3, 902]], True)
    # premise 5 tokens, hypothesis 2, room 4: the premise shrinks to 2 first, then both alternate
    assert transform("entailment", [[1, 2, 3, 4, 5], [8, 9]], S, 7) == ([[900, 1, 2, 901, 8, 9, 902]], True)


def test_classifier_scores_similarity_in_both_orders_and_masks_absent_answers():
    gpt, special = extend_vocabulary(build_model(get_preset("tiny").config(), seed=0), seed=0)
    model = GPTClassifier(gpt, "similarity", 3, 0.0).eval()
    a_b = transform("similarity", [[5, 6, 7], [8, 9]], special, 32)[0]
    b_a = transform("similarity", [[8, 9], [5, 6, 7]], special, 32)[0]
    tokens = torch.tensor([[a_b[0], a_b[1]], [b_a[0], b_a[1]]])  # [2, 2, 8]
    lengths = torch.full((2, 2), 8)
    scores, lm_logits = model(tokens, lengths, with_lm=True)
    assert scores.shape == (2, 3) and lm_logits.shape == (4, 8, 640)  # 512 + 3 special ids, padded to 128s
    torch.testing.assert_close(scores[0], scores[1])  # final states are added: order does not matter
    mc = GPTClassifier(gpt, "multiple_choice", 1, 0.0).eval()
    scores, none = mc(torch.randint(0, 500, (2, 3, 5)), torch.tensor([[5, 4, 0], [5, 5, 5]]), with_lm=False)
    assert none is None and scores.shape == (2, 3) and scores[0, 2] == float("-inf") and scores[1].isfinite().all()


def test_aux_lm_loss_counts_only_real_next_tokens():
    tokens = torch.tensor([[[1, 2, 3, 0]]])  # [1, 1, 4]: length 3, one padding position
    logits = torch.zeros(1, 4, 8)
    logits[0, 0, 2] = logits[0, 1, 3] = 100.0  # both real targets predicted with certainty
    logits[0, 2, 5] = 100.0  # position 2 predicts the padding: must not count
    assert float(lm_loss(logits, tokens, torch.tensor([[3]]))) == pytest.approx(0.0, abs=1e-6)
    assert float(lm_loss(logits, tokens, torch.tensor([[4]]))) > 30  # with the padding counted it is wrong


def test_special_tokens_are_new_rows_after_the_pretrained_vocabulary():
    gpt = build_model(get_preset("tiny").config(vocab_size=500), seed=0)
    extended, special = extend_vocabulary(gpt, seed=3)
    assert special == SpecialTokens(start=500, delimiter=501, extract=502) and extended.config.vocab_size == 503
    old, new = gpt.tok_embeddings.weight, extended.tok_embeddings.weight
    assert torch.equal(new[:500], old[:500])
    assert not torch.equal(new[500:503], old[500:503]) and 0.005 < float(new[500:503].detach().std()) < 0.05
    assert torch.equal(extended.blocks["0"].attn.wq.weight, gpt.blocks["0"].attn.wq.weight)


# ------------------------------------------------------------------------------------------ data errors


def test_missing_data_fields_name_the_file_line_and_field(tmp_path):
    task = FinetuneTaskConfig(type="entailment", fields={"premise": "p"}, labels=["no", "yes"])
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"p": "x", "hypothesis": "y", "label": "yes"}) + "\n\n"
                    + json.dumps({"p": "x", "label": 0}) + "\n")
    with pytest.raises(ValueError, match=f"{path} line 3: missing field 'hypothesis'"):
        load_examples(str(path), "train", task)
    path.write_text(json.dumps({"p": "x", "hypothesis": "y", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match=f"{path} line 1: field 'label' must be one of \\['no', 'yes'\\]"):
        load_examples(str(path), "train", task)
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("context,e0,e1,label\nQ,a,b,1\nQ,a,,0\n")
    mc = FinetuneTaskConfig(type="multiple_choice", fields={"choices": "e0,e1,e2"})
    with pytest.raises(ValueError, match=f"{csv_path} line 2: missing field 'e2'"):
        load_examples(str(csv_path), "train", mc)
    ok = load_examples(str(csv_path), "train", FinetuneTaskConfig(type="multiple_choice", fields={"choices": "e0,e1"}))
    assert [(x.texts, x.label) for x in ok] == [(["Q", "a", "b"], 1), (["Q", "a", ""], 0)]


# ------------------------------------------------------------------------------------------ runs

FILLER = "the a of and to in is it for on with as by this that from at or be not".split()


def synthetic(n: int, seed: int) -> list[dict]:
    """Label = which of two marker words the text contains, at a random place among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(FILLER) for _ in range(rng.randint(5, 10))]
        words.insert(rng.randint(0, len(words)), ["file", "list"][label])
        rows.append({"sentence": " ".join(words), "y": ["has_file", "has_list"][label]})
    return rows


@pytest.fixture(scope="module")
def job(tokenizer_model, tmp_path_factory):
    from gptforge.data_prep.tokenization.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("finetune")
    config = get_preset("tiny").config(vocab_size=Tokenizer(tokenizer_model).vocab_size)
    checkpoint = write_model_checkpoint(str(root / "pre" / "step_00000000"), build_model(config, seed=1),
                                        tokenizer_model, {"step": 0})
    for name, n, seed in (("train", 320, 1), ("eval", 100, 2)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic(n, seed)))
    cfg = {"checkpoint": checkpoint, "output_dir": str(root / "out"),
           "task": {"type": "classification", "fields": {"text": "sentence", "label": "y"},
                    "labels": ["has_file", "has_list"]},
           "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl")},
           "train": {"lr": 2e-3, "batch_size": 16, "epochs": 4, "warmup_fraction": 0.05, "log_interval": 50},
           "mlflow": {"enabled": False}}
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, str(path)


@pytest.mark.parametrize("aux", [0.5, 0.0])
def test_finetuning_beats_chance_with_and_without_the_aux_loss(job, aux):
    root, config = job
    out = root / f"out-{aux}"
    assert run_finetune(config, f"train.aux_lm_weight={aux}", f"output_dir={out}",
                        f"mlflow.enabled={'true' if aux else 'false'}") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["chance_accuracy"] < 0.6 and metrics["eval_accuracy"] >= 0.9, metrics["history"]
    assert metrics["steps"] == 80 and ("lm_loss" in metrics["final"]) == (aux > 0)
    assert (out / "mlflow.db").exists() == (aux > 0)

    loaded = load_finetuned(str(out / "model"))
    assert loaded.labels == ["has_file", "has_list"]
    assert loaded.special.extract == loaded.classifier.gpt.config.vocab_size - 1
    from gptforge.data_prep.tokenization.tokenizer import Tokenizer
    from gptforge.finetune.finetune import accuracy
    from gptforge.finetune.data import encode_examples

    examples = load_examples(str(root / "eval.jsonl"), "test", FinetuneTaskConfig(
        type="classification", fields={"text": "sentence", "label": "y"}, labels=loaded.labels))
    encode = Tokenizer(loaded.tokenizer_path).encode
    encoded, _ = encode_examples(examples, "classification", encode, loaded.special, 128)
    assert accuracy(loaded.classifier, encoded, 32, torch.device("cpu")) == metrics["eval_accuracy"]


def test_config_errors_are_collected_with_their_keys(job, tmp_path):
    _, config = job
    with pytest.raises(ConfigError) as info:
        run_finetune(config, "task.labels=null", "task.fields.premise=p", "train.lr=-1", "train.bogus=1",
                     f"data.eval={tmp_path / 'none.jsonl'}")
    text = "\n".join(info.value.errors)
    assert "train.bogus: unknown key" in text
    # value checks run once the types are right: fix the unknown key and see the rest together
    with pytest.raises(ConfigError) as info:
        run_finetune(config, "task.labels=null", "task.fields.premise=p", "train.lr=-1",
                     f"data.eval={tmp_path / 'none.jsonl'}")
    text = "\n".join(info.value.errors)
    for part in ("task.labels: a classification task needs", "task.fields.premise: not a field of a classification",
                 "train.lr must be >= 0", "data.eval: no such file"):
        assert part in text


def test_bad_data_file_is_one_error_line_with_its_location(job, tmp_path, capsys):
    """A bad line in a fine-tuning file is bad input (``error: …``, exit 2), not a traceback."""
    from gptforge.launcher import cli

    _, config = job
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sentence": "fine", "y": "has_file"}) + "\n" + json.dumps({"sentence": 3, "y": "has_file"}) + "\n")
    assert cli.main(["finetune", "--config", config, f"data.train={bad}", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{bad} line 2" in err and "Traceback" not in err


def test_shipped_example_config_is_valid(monkeypatch):
    import os

    from gptforge.finetune.finetune import resolve_config

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = resolve_config("configs/finetune/example-classification.yaml", [])
    assert (cfg.task.type, cfg.train.aux_lm_weight, cfg.train.lr) == ("classification", 0.5, 6.25e-5)
    examples = load_examples(cfg.data.train, cfg.data.train_split, cfg.task)
    assert len(examples) == 30 and {x.label for x in examples} == {0, 1}
