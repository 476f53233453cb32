"""Generation with a KV cache: cached logits equal the full forward, sampling controls, and
``gptforge generate`` end to end on a trained checkpoint."""

import argparse
import json
import os

import pytest
import torch
import yaml

from helpers.corpus import base_config
from helpers.launch import run_train

from gptforge.evaluation import cli as eval_cli
from gptforge.model import build_model, get_preset
from gptforge.model.gpt import KVCache
from gptforge.model.sample import SamplingConfig, SamplingError, check_prompt, filter_logits, generate, sample

PRESETS = ["tiny", "tiny-post-ln", "tiny-sparse"]


def tiny_model(preset: str = "tiny", **overrides):
    return build_model(get_preset(preset).config(**overrides), seed=1).eval()


@pytest.mark.parametrize("preset", PRESETS + ["tiny-dropout"])
def test_cached_logits_equal_full_forward(preset):
    """Prefill, a multi-token chunk at an offset, then single tokens past the sparse layers' 16-token window:
    every position's logits equal one forward over the whole sequence (dropout is off in eval)."""
    model = tiny_model("tiny", dropout=0.1) if preset == "tiny-dropout" else tiny_model(preset)
    tokens = torch.randint(0, 512, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(tokens)  # [2, 70, V]
        cache = KVCache.allocate(model.config, batch_size=2, capacity=70)
        got = [model.forward_cached(tokens[:, :20], cache, 0), model.forward_cached(tokens[:, 20:25], cache, 20)]
        got += [model.forward_cached(tokens[:, t : t + 1], cache, t) for t in range(25, 70)]
        assert cache.length == 70
        last = model.forward_cached(tokens[:, 60:], cache, 60, last_only=True)  # rewinding overwrites the tail
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, want[:, -1:], rtol=1e-5, atol=1e-5)


def test_cache_misuse_is_a_clear_error():
    model = tiny_model()
    cache = KVCache.allocate(model.config, batch_size=1, capacity=8)
    with pytest.raises(ValueError, match="start_pos 3 must be in \\[0, cache.length=0\\]"):
        model.forward_cached(torch.zeros(1, 2, dtype=torch.long), cache, 3)
    with pytest.raises(ValueError, match="exceed the KV cache capacity 8"):
        model.forward_cached(torch.zeros(1, 9, dtype=torch.long), cache, 0)
    with pytest.raises(ValueError, match="2 sequences but the KV cache holds 1"):
        model.forward_cached(torch.zeros(2, 1, dtype=torch.long), cache, 0)
    with pytest.raises(ValueError, match="capacity must be in \\[1, model.context_length=128\\]"):
        KVCache.allocate(model.config, batch_size=1, capacity=129)


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_with_cache_equals_step_by_step_recompute(preset):
    model = tiny_model(preset)
    prompt = [5, 17, 300, 42, 7]
    want = sample(model, prompt, max_new_tokens=40, temperature=0)  # recomputes the whole window each step
    got = generate(model, prompt, SamplingConfig(max_new_tokens=40, temperature=0, num_sequences=3))
    assert got.sequences == [want] * 3
    assert got.finish_reasons == ["length"] * 3 and got.prompt_tokens == 5


def draw(model, seed, **settings):
    config = SamplingConfig(max_new_tokens=30, **({"num_sequences": 2} | settings))
    return generate(model, [1, 2, 3], config, generator=torch.Generator().manual_seed(seed)).sequences


def test_same_seed_same_tokens_different_seed_different():
    model = tiny_model()
    assert draw(model, 7) == draw(model, 7)
    assert draw(model, 7) != draw(model, 8)
    rows = draw(model, 7, num_sequences=4)
    assert len(rows) == 4 and all(len(r) == 30 for r in rows)
    assert len({tuple(r) for r in rows}) == 4  # the rows of a batch are independent draws


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny_model("tiny-sparse")
    greedy = draw(model, 0, temperature=0)
    assert draw(model, 3, temperature=1.5, top_k=1) == greedy
    assert draw(model, 3, temperature=1.5, top_p=1e-6) == greedy
    assert draw(model, 3, temperature=1.5) != greedy  # the comparison above can fail


def test_top_k_and_top_p_keep_the_expected_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()

    def kept(**kw):
        return torch.isfinite(filter_logits(logits, **kw))[0].tolist()

    assert kept(top_k=None, top_p=1.0) == [True, True, True, True]
    assert kept(top_k=2, top_p=1.0) == [True, True, False, False]
    assert kept(top_k=None, top_p=0.7) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.7
    assert kept(top_k=None, top_p=0.45) == [True, False, False, False]  # the first token always stays
    assert kept(top_k=3, top_p=0.9) == [True, True, True, False]
    # Sampled frequencies inside the nucleus keep their proportions (5:3).
    from gptforge.model.sample import next_tokens

    ids = next_tokens(logits.expand(4000, -1), temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(ids, minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 4000 - 0.625) < 0.03


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_padding_ids_are_never_produced(temperature):
    model = tiny_model(vocab_size=130)  # 130 real ids padded to 256 rows
    vocab = model.config.vocab_size
    assert model.config.padded_vocab_size == 256
    with torch.no_grad():  # make the padding rows irresistible if they were allowed
        noise = torch.randn(256 - vocab, 64, generator=torch.Generator().manual_seed(0))
        model.tok_embeddings.weight[vocab:] = 50 * noise
    assert model(torch.tensor([[1, 2]]))[0, -1].argmax() >= vocab  # padding would win without the cut
    rows = draw(model, 0, temperature=temperature, num_sequences=4)
    assert all(0 <= t < vocab for row in rows for t in row)


def test_stop_token_ends_a_sequence_and_context_caps_the_rest():
    model = tiny_model()
    greedy = draw(model, 0, temperature=0, num_sequences=1)[0]
    stop = greedy[4]
    first = greedy.index(stop)
    out = generate(model, [1, 2, 3], SamplingConfig(max_new_tokens=30, temperature=0, stop_token=stop))
    assert out.sequences == [greedy[:first]] and out.finish_reasons == ["stop"]
    # 120 prompt tokens in a 128-token context leave room for 8 new ones.
    out = generate(model, list(range(120)), SamplingConfig(max_new_tokens=20, temperature=0))
    assert [len(s) for s in out.sequences] == [8] and out.finish_reasons == ["context"]
    assert out.sequences[0] == sample(model, list(range(120)), max_new_tokens=8, temperature=0)


def test_bad_prompts_and_settings_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="the prompt is empty"):
        check_prompt([], model)
    with pytest.raises(ValueError, match="128 tokens long, but the model's context is 128 tokens.*at most 127"):
        generate(model, [1] * 128, SamplingConfig())
    with pytest.raises(ValueError, match="outside the model's vocabulary \\[0, 512\\): \\[600\\]"):
        check_prompt([1, 600], model)
    for field, value, message in [("temperature", -0.5, "must be >= 0"), ("top_p", 0.0, "must be in \\(0, 1\\]"),
                                  ("top_p", 1.5, "must be in \\(0, 1\\]"), ("top_k", 0, "must be >= 1"),
                                  ("max_new_tokens", 0, "must be >= 1"), ("num_sequences", 0, "must be >= 1")]:
        with pytest.raises(SamplingError, match=f"{field} {message}") as info:
            SamplingConfig(**{field: value})
        assert list(info.value.problems) == [field]


# ---- the command, end to end on a checkpoint of a real training run ----

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_model, indexed_prefix) -> str:
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    cfg = base_config(run_dir, tokenizer_model, indexed_prefix)
    cfg["train"] |= {"max_steps": 4, "eval_interval": 0}
    cfg["checkpoint"] = {"interval": 4, "keep_last": 1}
    path = run_dir.parent / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_train(str(path))
    assert proc.returncode == 0, proc.stderr
    step_dir = run_dir / "checkpoints" / "step_00000004"
    assert step_dir.is_dir()
    return str(step_dir)


def gptforge_generate(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="gptforge generate")
    eval_cli.add_generate_arguments(parser)
    return eval_cli.run_generate(parser.parse_args(list(argv)))


def test_generate_command_json_and_text(checkpoint, tmp_path, capsys):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Return the\n")
    argv = [checkpoint, "--prompt", "def ", "--prompt-file", str(prompt_file), "--max-new-tokens", "12",
            "--num-sequences", "3", "--top-k", "50", "--top-p", "0.95", "--seed", "5", "--json"]
    assert gptforge_generate(*argv) == 0
    out = capsys.readouterr()
    assert "step_00000004 (step 4)" in out.err
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert [r["prompt"] for r in lines] == ["def ", "Return the"]  # file order kept, final newline dropped
    for record in lines:
        assert record["prompt_tokens"] > 0 and len(record["sequences"]) == 3
        for seq in record["sequences"]:
            assert 0 <= seq["new_tokens"] <= 12 and seq["finish_reason"] in ("stop", "length")
            assert (seq["new_tokens"] == 12) == (seq["finish_reason"] == "length")
    assert gptforge_generate(*argv) == 0
    assert capsys.readouterr().out == out.out  # same seed, same text
    assert gptforge_generate(*argv[:-3], "--seed", "6", "--json") == 0
    assert capsys.readouterr().out != out.out

    # Text output: a header per sequence, then prompt + continuation.
    assert gptforge_generate(checkpoint, "--prompt", "The ", "--num-sequences", "2", "--max-new-tokens", "5") == 0
    text = capsys.readouterr().out
    assert text.count("=== prompt 1, sequence ") == 2 and "sequence 2/2:" in text
    assert "\nThe " in text


def test_generate_command_greedy_matches_the_model(checkpoint, capsys):
    from gptforge.data_prep.tokenization.tokenizer import Tokenizer
    from gptforge.training.trained_model import load_trained_model

    assert gptforge_generate(checkpoint, "--prompt", "import ", "--temperature", "0", "--max-new-tokens", "15",
                             "--json") == 0
    record = json.loads(capsys.readouterr().out)
    trained = load_trained_model(checkpoint)
    tok = Tokenizer(trained.tokenizer_path)
    ids = sample(trained.model, tok.encode("import "), max_new_tokens=15, temperature=0, stop_token=tok.eod)
    ids = ids[:-1] if ids and ids[-1] == tok.eod else ids
    assert record["sequences"][0]["text"] == tok.decode(ids)
    assert record["sequences"][0]["new_tokens"] == len(ids)


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "word " * 200], r"--prompt #1: the prompt is \d+ tokens long, but the model's context is 128"),
    (["--prompt", ""], "--prompt #1 is empty"),
    ([], "give at least one --prompt TEXT or --prompt-file FILE"),
    (["--prompt", "a", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--prompt", "a", "--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--prompt", "a", "--top-p", "1.01", "--top-k", "0"], r"--top-k must be >= 1, got 0; --top-p must be in"),
    (["--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt", "a", "--num-sequences", "0"], "--num-sequences must be >= 1"),
    (["--prompt", "a", "--seed", "-1"], "--seed must be >= 0"),
    (["--prompt-file", "/nonexistent/p.txt"], "--prompt-file /nonexistent/p.txt: cannot read it"),
    (["--prompt", "a", "--device", "nowhere"], "--device 'nowhere' is not a device"),
])
def test_generate_command_bad_input(checkpoint, argv, message, capsys):
    with pytest.raises(ValueError, match=message):
        gptforge_generate(checkpoint, *argv)
    assert capsys.readouterr().out == ""  # nothing is generated before every input is checked


def test_generate_command_rejects_a_folder_that_is_no_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="holds no complete gptforge checkpoint"):
        gptforge_generate(str(tmp_path), "--prompt", "a")
    assert os.listdir(tmp_path) == []
