import ast
import math
import pathlib

import pytest
import torch

from gptforge.model import GPTConfig, build_model, get_preset
from gptforge.model.flops import count_parameters
from gptforge.model.gpt import Attention, banded_causal_mask
from gptforge.model.presets import PRESETS, gpt3_presets
from gptforge.model.sample import sample

pytestmark = pytest.mark.unit

MODEL_DIR = pathlib.Path(__file__).resolve().parents[1] / "model"

# GPT-3 Table 2.1 n_params
TABLE_2_1 = {"gpt3-125m": 125e6, "gpt3-350m": 350e6, "gpt3-760m": 760e6, "gpt3-1.3b": 1.3e9,
             "gpt3-2.7b": 2.7e9, "gpt3-6.7b": 6.7e9, "gpt3-13b": 13.0e9, "gpt3-175b": 175.0e9}


@pytest.mark.parametrize("name", list(TABLE_2_1))
def test_gpt3_parameter_counts_within_2_5_percent_of_table(name):
    counts = count_parameters(get_preset(name).config())
    assert abs(counts["unpadded"] / TABLE_2_1[name] - 1) < 0.025
    assert abs(counts["total"] / TABLE_2_1[name] - 1) < 0.025


def test_reference_counts_match_shared_numbers():
    # GPT-3 Table 2.1 shapes counted with vocab 50,257, tied embeddings, biases, LayerNorms (13B at 5120)
    expected = [125.2e6, 355.9e6, 760.0e6, 1.316e9, 2.652e9, 6.658e9, 12.85e9, 174.6e9]
    got = [count_parameters(p.config())["unpadded"] for p in gpt3_presets()]
    for g, e in zip(got, expected):
        assert abs(g / e - 1) < 0.001, (g, e)


def test_every_preset_cites_a_source_and_is_consistent():
    for preset in PRESETS.values():
        cfg = preset.config()
        assert preset.source
        assert cfg.d_model % cfg.n_head == 0
        if preset.name.startswith("gpt3-"):
            assert cfg.context_length == 2048 and preset.batch_tokens and preset.lr
            assert cfg.head_dim in (64, 80, 96, 128)


def test_family_architecture_choices():
    assert get_preset("gpt1").config().norm_position == "post"
    assert not get_preset("gpt1").config().final_norm
    assert get_preset("gpt1").config().context_length == 512
    gpt2 = get_preset("gpt2-124m").config()
    assert gpt2.norm_position == "pre" and gpt2.final_norm and gpt2.context_length == 1024
    assert count_parameters(gpt2)["unpadded"] == 124_439_808  # the released GPT-2 small


def test_padded_vocab_and_tied_embeddings():
    cfg = GPTConfig(n_layer=1, d_model=32, n_head=2, vocab_size=300, context_length=16)
    model = build_model(cfg, seed=0)
    assert cfg.padded_vocab_size == 384
    assert model.tok_embeddings.weight.shape == (384, 32)
    logits = model(torch.randint(0, 300, (2, 5)))
    assert logits.shape == (2, 5, 384)
    # tied: output projection is the embedding matrix
    tokens = torch.tensor([[1, 2]])
    torch.testing.assert_close(model(tokens), model.hidden_states(tokens) @ model.tok_embeddings.weight.T)


def test_padding_is_never_sampled():
    cfg = GPTConfig(n_layer=1, d_model=32, n_head=2, vocab_size=130, context_length=32)
    model = build_model(cfg, seed=0)
    with torch.no_grad():  # make the padding rows irresistible if they were allowed
        model.tok_embeddings.weight[130:] = 10.0
    out = sample(model, [1, 2], max_new_tokens=20, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert max(out) < 130


@pytest.mark.parametrize("preset", ["tiny", "tiny-post-ln", "tiny-sparse"])
def test_future_tokens_never_change_earlier_logits(preset):
    model = build_model(get_preset(preset).config(), seed=0).eval()
    x = torch.randint(0, 512, (2, 40))
    y = x.clone()
    y[:, 25:] = torch.randint(0, 512, (2, 15))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :25], b[:, :25], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_sparse_layer_is_banded_and_dense_layer_is_not():
    cfg = get_preset("tiny-sparse").config()
    torch.manual_seed(0)
    sparse, dense = Attention(cfg, layer=1), Attention(cfg, layer=0)
    x = torch.randn(1, 40, cfg.d_model)
    y = x.clone()
    y[:, 0] += 1.0  # token 0 is outside the 16-token window of positions >= 16
    with torch.no_grad():
        torch.testing.assert_close(sparse(x)[:, 16:], sparse(y)[:, 16:])
        assert not torch.allclose(sparse(x)[:, :16], sparse(y)[:, :16])
        assert not torch.allclose(dense(x)[:, 16:], dense(y)[:, 16:])
    mask = banded_causal_mask(5, 2, torch.device("cpu"))
    assert mask.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]


def test_residual_projection_init_is_scaled():
    cfg = GPTConfig(n_layer=8, d_model=256, n_head=4, context_length=16, vocab_size=256)
    model = build_model(cfg, seed=0)
    block = model.blocks["0"]
    assert abs(block.attn.wq.weight.std().item() - 0.02) < 0.002
    assert abs(block.mlp.fc_out.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0005
    assert torch.all(block.attn.wq.bias == 0) and torch.all(block.ln_1.weight == 1)


def test_meta_build_then_init_matches_direct_build():
    cfg = get_preset("tiny").config()
    direct = build_model(cfg, seed=5)
    with torch.device("meta"):
        from gptforge.model.gpt import GPT

        meta = GPT(cfg)
    meta.to_empty(device="cpu")
    meta.init_weights(5)
    for (n1, p1), (n2, p2) in zip(direct.named_parameters(), meta.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.d_model .* divisible by model.n_head"):
        GPTConfig(n_layer=1, d_model=30, n_head=4)
    with pytest.raises(ValueError, match="model.dropout"):
        GPTConfig(n_layer=1, d_model=32, n_head=4, dropout=1.5)


def test_too_long_sequence_is_a_clear_error():
    model = build_model(get_preset("tiny").config(), seed=0)
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_model_package_never_imports_torch_distributed():
    for path in MODEL_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith("torch.distributed") for n in names), path
