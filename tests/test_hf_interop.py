"""Hugging Face interop: ``export-hf`` (same logits in transformers, offline pipeline, tokenizers of both
kinds), refusals, ``import-hf`` (same logits in gptforge, training resumes), and the byte-level BPE kind."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers.launch import losses, run_train

from gptforge.data_prep.tokenization.indexed_writer import tokenize_to_indexed
from gptforge.data_prep.tokenization.tokenizer import BYTE_BPE, EOD_TOKEN, Tokenizer, train_tokenizer_of_kind
from gptforge.launcher.cli import load_command
from gptforge.data_prep.tokenization.cli import add_tokenizer_kind_argument
from gptforge.interop.hf_export import export_hf
from gptforge.interop.hf_import import import_hf
from gptforge.training.checkpoint import write_model_checkpoint
from gptforge.training.trained_model import load_trained_model
from gptforge.model import build_model, get_preset

TEXTS = ["", " ", "Hello world", "  two  spaces \n\n\tand tabs ", "\u2581 marks \u2581\u2581x\u2581",
         "日本語のテキスト",
         "emoji \U0001F600 and \U0010FFFF", "e\u0301 vs \u00e9", "digits 12345 6.02e23", "\x00\x01\r\n",
         f"a {EOD_TOKEN} b", "def f(x):\n    return x ** 2  # it's"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def hf_cli(*argv: str):
    """Run ``export-hf``/``import-hf`` through their parsers, as the console script does."""
    command, *rest = argv
    add_arguments, run = load_command(command)
    parser = argparse.ArgumentParser(prog=f"gptforge {command}")
    add_arguments(parser)
    return run(parser.parse_args(rest))


def checkpoint_of(root, tokenizer_path: str, preset: str = "tiny", **overrides) -> str:
    """A checkpoint of a tiny model whose biases and LayerNorm gains are random too (not 0 and 1), so
    that a wrong mapping of any tensor shows in the logits."""
    config = get_preset(preset).config(vocab_size=Tokenizer(tokenizer_path).vocab_size, **overrides)
    model = build_model(config, seed=11)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1.0 * name.endswith("weight") + 0.2 * torch.randn(param.shape, generator=generator))
    return write_model_checkpoint(str(root / "ckpt" / "step_00000000"), model.eval(), tokenizer_path, {"step": 0})


def assert_same_model(folder: str, checkpoint: str) -> None:
    """transformers' GPT2LMHeadModel logits and GPT2Model hidden states == ours (fp32)."""
    from transformers import GPT2LMHeadModel, GPT2Model

    ours = load_trained_model(checkpoint).model
    cfg = ours.config
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.context_length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(tokens)  # [B, T, V_padded]
        lm = GPT2LMHeadModel.from_pretrained(folder, local_files_only=True).eval()
        assert lm.config.vocab_size == cfg.vocab_size
        torch.testing.assert_close(lm(tokens).logits, want[..., : cfg.vocab_size], rtol=0, atol=1e-5)
        base = GPT2Model.from_pretrained(folder, local_files_only=True).eval()
        torch.testing.assert_close(base(tokens).last_hidden_state, ours.hidden_states(tokens), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def spm_export(tokenizer_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("spm_export")
    checkpoint = checkpoint_of(root, tokenizer_model)
    assert hf_cli("export-hf", checkpoint, str(root / "hf")) == 0
    return checkpoint, str(root / "hf")


def test_export_has_our_logits_and_hidden_states(spm_export):
    checkpoint, folder = spm_export
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md"} <= set(os.listdir(folder))
    assert not [n for n in os.listdir(os.path.dirname(folder)) if n.startswith((".tmp-", ".old-"))]
    assert_same_model(folder, checkpoint)


def test_bias_false_exports_exactly(tokenizer_model, tmp_path):
    checkpoint = checkpoint_of(tmp_path, tokenizer_model, bias=False)
    export_hf(checkpoint, str(tmp_path / "hf"))
    assert_same_model(str(tmp_path / "hf"), checkpoint)


def test_pipeline_runs_offline_and_generates_our_greedy_tokens(spm_export):
    checkpoint, folder = spm_export
    trained = load_trained_model(checkpoint)
    tok = Tokenizer(trained.tokenizer_path)
    prompt = "The module"
    ids = tok.encode(prompt)
    with torch.no_grad():
        for _ in range(8):
            logits = trained.model(torch.tensor([ids]))[0, -1, : trained.config.vocab_size]
            ids.append(int(logits.argmax()))
    script = ("import sys; from transformers import pipeline; "
              "g = pipeline('text-generation', model=sys.argv[1]); "
              "print(repr(g(sys.argv[2], max_new_tokens=8, min_new_tokens=8, do_sample=False)[0]['generated_text']))")
    done = subprocess.run([sys.executable, "-c", script, folder, prompt], capture_output=True, text=True,
                          env=dict(os.environ, **OFFLINE), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == repr(tok.decode(ids))


def test_sentencepiece_tokenizer_json_encodes_and_decodes_like_ours(spm_export, corpus_jsonl):
    from transformers import AutoTokenizer, GPT2Tokenizer

    checkpoint, folder = spm_export
    ours = Tokenizer(load_trained_model(checkpoint).tokenizer_path)
    hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert hf.eos_token == hf.bos_token == EOD_TOKEN and hf.eos_token_id == ours.eod
    docs = [json.loads(line)["text"] for line in open(corpus_jsonl)][:100]
    for text in TEXTS + docs:
        ids = ours.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == ours.decode(ids) == text
    readme = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert "GPT2Tokenizer` must not be used" in readme and "AutoTokenizer.from_pretrained" in readme
    # What the README warns about: GPT-2's byte-level pipeline cannot reproduce these ids.
    try:
        gpt2_tok = GPT2Tokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, TypeError, ValueError):
        return
    assert any(gpt2_tok(text)["input_ids"] != ours.encode(text) for text in docs[:10])


@pytest.mark.parametrize("preset,overrides,flag", [
    ("tiny-sparse", {}, "model.attention_pattern"),
    ("tiny-post-ln", {}, "model.norm_position"),
    ("tiny", {"final_norm": False}, "model.final_norm"),
])
def test_unsupported_settings_are_refused_and_nothing_is_written(tokenizer_model, tmp_path, preset, overrides, flag):
    checkpoint = checkpoint_of(tmp_path, tokenizer_model, preset, **overrides)
    out = tmp_path / "out" / "hf"
    with pytest.raises(ValueError, match=flag):
        hf_cli("export-hf", checkpoint, str(out))
    assert not out.parent.exists() or os.listdir(out.parent) == []


def test_export_refuses_to_replace_out_without_overwrite(spm_export, tmp_path):
    checkpoint, _ = spm_export
    (tmp_path / "hf").mkdir()
    with pytest.raises(ValueError, match="--overwrite"):
        export_hf(checkpoint, str(tmp_path / "hf"))
    export_hf(checkpoint, str(tmp_path / "hf"), overwrite=True, verify=False)
    assert "model.safetensors" in os.listdir(tmp_path / "hf")


@pytest.fixture(scope="module")
def byte_bpe(corpus_jsonl, tmp_path_factory):
    """A byte-level BPE trained on the corpus and the corpus tokenized with it."""
    root = tmp_path_factory.mktemp("byte_bpe")
    parser = argparse.ArgumentParser()
    add_tokenizer_kind_argument(parser)
    assert parser.parse_args(["--kind", "byte-bpe"]).kind == BYTE_BPE
    result = train_tokenizer_of_kind(BYTE_BPE, [corpus_jsonl], str(root / "bpe"), vocab_size=600)
    assert os.path.isfile(root / "bpe.vocab.json") and os.path.isfile(root / "bpe.merges.txt")
    prefix = str(root / "docs")
    tokenize_to_indexed([corpus_jsonl], prefix, result.model_path, progress=False)
    return result.model_path, prefix


def test_byte_bpe_tokenizer(byte_bpe, tmp_path):
    tok = Tokenizer(byte_bpe[0])
    assert tok.kind == BYTE_BPE and tok.vocab_size == 600 and tok.sp is None
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids) and tok.decode(ids) == text
    assert tok.eod not in tok.encode(f"a {EOD_TOKEN} b")  # typed text never becomes the separator
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    shutil.copyfile(byte_bpe[0], tmp_path / "tokenizer.model")  # the kind is read from the content
    assert Tokenizer(str(tmp_path / "tokenizer.model")).encode("Hello world") == tok.encode("Hello world")
    with pytest.raises(ValueError, match="--threads"):
        train_tokenizer_of_kind(BYTE_BPE, ["x.jsonl"], str(tmp_path / "t"), vocab_size=600, num_threads=2)


def test_byte_bpe_model_trains_exports_imports_and_resumes(byte_bpe, write_config, tmp_path):
    from transformers import AutoTokenizer, GPT2Tokenizer

    tokenizer_path, prefix = byte_bpe
    data = {"sources": [{"path": prefix, "weight": 1.0}]}
    config = write_config(tokenizer={"path": tokenizer_path}, data=data, run={"dir": str(tmp_path / "run")},
                          train={"max_steps": 2, "eval_interval": 0}, checkpoint={"interval": 2})
    done = run_train(config)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = str(tmp_path / "run" / "checkpoints" / "step_00000002")
    assert os.path.isfile(os.path.join(checkpoint, "tokenizer.json"))  # named for its kind

    out = str(tmp_path / "hf")
    export_hf(checkpoint, out)
    assert_same_model(out, checkpoint)
    ours = Tokenizer(tokenizer_path)
    only_gpt2_files = tmp_path / "vocab_merges"  # GPT2Tokenizer from vocab.json + merges.txt alone
    only_gpt2_files.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(os.path.join(out, name), only_gpt2_files / name)
    for folder in (out, str(only_gpt2_files)):
        for hf_tok in (GPT2Tokenizer.from_pretrained(folder, local_files_only=True),
                       AutoTokenizer.from_pretrained(folder, local_files_only=True)):
            assert hf_tok.eos_token_id == ours.eod
            for text in TEXTS:
                assert hf_tok(text)["input_ids"] == ours.encode(text), (folder, text)
                assert hf_tok.decode(ours.encode(text)) == text

    # The export imported again is the same model, and training continues from it.
    imported = hf_cli("import-hf", out, str(tmp_path / "continued"))
    assert imported == 0
    step0 = str(tmp_path / "continued" / "checkpoints" / "step_00000000")
    trained, back = load_trained_model(checkpoint), load_trained_model(step0)
    assert back.config.padded_vocab_size == back.config.vocab_size == ours.vocab_size
    tokens = torch.randint(0, ours.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back.model(tokens), trained.model(tokens)[..., : ours.vocab_size],
                                   rtol=0, atol=1e-5)
    config = write_config("continue.yaml", tokenizer={"path": back.tokenizer_path}, data=data,
                          run={"dir": str(tmp_path / "continued")}, model={"preset": "tiny", "pad_vocab_multiple": 1},
                          train={"max_steps": 2, "eval_interval": 0}, checkpoint={"interval": 2})
    done = run_train(config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {step0} at step 0" in done.stdout
    # Step 1 of both runs sees the same batch (data position 0): the imported model was trained on it.
    fresh, continued = losses(tmp_path / "run")[1], losses(tmp_path / "continued")[1]
    assert continued < fresh - 0.1  # a fresh init would give the fresh run's loss (ln 600 ~ 6.4)
    assert "not found" not in done.stderr  # no RNG warning for an imported checkpoint
    assert os.path.isdir(tmp_path / "continued" / "checkpoints" / "step_00000002")


def test_import_of_a_transformers_gpt2_has_its_logits(byte_bpe, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    tokenizer_path, _ = byte_bpe
    files = tmp_path / "gpt2_files"
    files.mkdir()
    from gptforge.data_prep.tokenization.byte_bpe import write_vocab_and_merges

    write_vocab_and_merges(tokenizer_path, str(files / "vocab.json"), str(files / "merges.txt"))
    hf_tok = GPT2Tokenizer.from_pretrained(str(files))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(hf_tok), n_positions=96, n_embd=48, n_layer=3, n_head=4, n_inner=80,
                        bos_token_id=hf_tok.eos_token_id, eos_token_id=hf_tok.eos_token_id)
    gpt2 = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in gpt2.named_parameters():
            if param.dim() == 1:
                param.normal_(float(name.endswith("weight")), 0.2)
    folder = tmp_path / "gpt2"
    gpt2.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    path = import_hf(str(folder), str(tmp_path / "run"))
    trained = load_trained_model(path)
    assert trained.config.ffn_dim == 80 and trained.config.context_length == 96
    tokens = torch.randint(0, len(hf_tok), (2, 96), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(trained.model(tokens), gpt2(tokens).logits, rtol=0, atol=1e-5)
    text = "Hello world, it's \u2581 日本"
    assert Tokenizer(trained.tokenizer_path).encode(text) == hf_tok(text)["input_ids"]
    state = json.load(open(os.path.join(path, "trainer_state.json")))
    assert state["weights_only"] and state["step"] == 0 and state["tokens_seen"] == 0
    with pytest.raises(ValueError, match="already holds checkpoints"):
        import_hf(str(folder), str(tmp_path / "run"))
    # Only GPT-2's two tokenizer files, and a padded vocabulary (mean rows: logits of the real ones unchanged)
    os.remove(folder / "tokenizer.json")
    shutil.copyfile(files / "vocab.json", folder / "vocab.json")
    shutil.copyfile(files / "merges.txt", folder / "merges.txt")
    padded = load_trained_model(import_hf(str(folder), str(tmp_path / "run2"), pad_vocab_multiple=128))
    assert padded.config.padded_vocab_size == 640
    with torch.no_grad():
        torch.testing.assert_close(padded.model(tokens)[..., : len(hf_tok)], gpt2(tokens).logits, rtol=0, atol=1e-5)
    assert Tokenizer(padded.tokenizer_path).encode(text) == hf_tok(text)["input_ids"]
