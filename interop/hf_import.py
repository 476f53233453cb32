"""``gptforge import-hf IN OUT_RUN_DIR``: a local ``transformers`` GPT-2 folder -> a gptforge checkpoint
to continue pretraining from.

Writes ``OUT_RUN_DIR/checkpoints/step_00000000`` in the format ``CheckpointManager`` writes: DCP files
holding ``model`` (our parameter names) and ``optim`` (Adam moments of zero at step 0, what a fresh
optimizer holds, for DeepSpeed's reader), ``trainer_state.json`` (step, tokens and samples 0, the model
config and shape, ``"weights_only": true``) and the tokenizer as ``tokenizer.json`` (byte-level BPE).
``gptforge train`` with ``run.dir: OUT_RUN_DIR`` (or ``--resume`` that folder) starts from these
weights with a fresh optimizer, the config's hyperparameters and the schedule from token 0; its data
must be tokenized with the checkpoint's ``tokenizer.json``.

The model config keeps GPT-2's vocabulary unpadded (``pad_vocab_multiple: 1``): the training loss
takes its softmax over every embedding row, so an extra row would change GPT-2's distribution. The
train config therefore needs ``model.pad_vocab_multiple: 1`` too (or import with a larger
``--pad-vocab-multiple``, e.g. for tensor parallelism: the extra rows are the mean embedding row,
whose logit is the average logit, far below the likely tokens', so they hold little probability).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from ..common.errors import UserError
from ..data_prep.tokenization.byte_bpe import ByteBPE, byte_bpe_from_vocab_and_merges
from ..data_prep.tokenization.tokenizer import Tokenizer
from ..training.checkpoint import TOKENIZER_FILES, write_model_checkpoint
from ..model.config import GPTConfig
from ..model.gpt import GPT

CHECKPOINT_NAME = "step_00000000"
# GPT-2's GELU is the tanh approximation; transformers names it two ways.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def unsupported_settings(hf: dict) -> list[str]:
    """Why a GPT-2 ``config.json`` (as a dict) cannot become our model (empty when it can)."""
    errors = []
    if hf.get("model_type") != "gpt2":
        errors.append(f"config.json: model_type is {hf.get('model_type')!r}, only 'gpt2' can be imported")
        return errors
    if hf.get("activation_function", "gelu_new") not in TANH_GELUS:
        errors.append(f"config.json: activation_function {hf.get('activation_function')!r}; gptforge uses the tanh "
                      f"GELU ({' or '.join(TANH_GELUS)})")
    if not hf.get("scale_attn_weights", True):
        errors.append("config.json: scale_attn_weights is false; gptforge scales attention by 1/sqrt(head_dim)")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        errors.append("config.json: scale_attn_by_inverse_layer_idx is true; gptforge has no per-layer attention scale")
    if hf.get("add_cross_attention", False):
        errors.append("config.json: add_cross_attention is true; gptforge is decoder-only")
    return errors


def _read_tokenizer(folder: str):
    """The folder's byte-level BPE as a ``tokenizers.Tokenizer``: its ``tokenizer.json``, or one built
    from GPT-2's ``vocab.json`` + ``merges.txt``."""
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer_json = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tokenizer_json):
        ByteBPE(tokenizer_json)  # refuses anything but a byte-level BPE with <|endoftext|>
        return HFTokenizer.from_file(tokenizer_json)
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if not (os.path.isfile(vocab_path) and os.path.isfile(merges_path)):
        raise UserError(f"import-hf: {folder!r} has no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    with open(vocab_path, encoding="utf-8") as handle:
        vocab = json.load(handle)
    with open(merges_path, encoding="utf-8") as handle:
        merges = [tuple(line.split(" ")) for line in handle.read().splitlines()
                  if line and not line.startswith("#version")]
    return byte_bpe_from_vocab_and_merges(vocab, merges)


def gptforge_config(hf: dict, vocab_size: int, pad_vocab_multiple: int) -> GPTConfig:
    """Our model config for a GPT-2 ``config.json`` (as a dict)."""
    n_embd = hf["n_embd"]
    return GPTConfig(
        n_layer=hf["n_layer"], d_model=n_embd, n_head=hf["n_head"], d_ffn=hf.get("n_inner") or 4 * n_embd,
        context_length=hf["n_positions"], vocab_size=vocab_size, pad_vocab_multiple=pad_vocab_multiple,
        norm_position="pre", final_norm=True, bias=True, layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
        # One dropout rate in gptforge; every released GPT-2 uses the same for all three.
        dropout=hf.get("resid_pdrop", 0.1),
    )


def gptforge_state_dict(gpt2: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel``'s weights under our names (the inverse of ``hf_export.gpt2_state_dict``)."""
    wte = gpt2["transformer.wte.weight"]  # [V, D]
    padding = config.padded_vocab_size - config.vocab_size
    # Padding rows: the mean row gives the average logit (see the module docstring).
    embedding = torch.cat([wte, wte.mean(dim=0, keepdim=True).expand(padding, -1)])  # [V_padded, D]
    ours = {"tok_embeddings.weight": embedding, "pos_embeddings.weight": gpt2["transformer.wpe.weight"]}
    for i in range(config.n_layer):
        src, dst = f"transformer.h.{i}", f"blocks.{i}"
        for ln in ("ln_1", "ln_2"):
            ours[f"{dst}.{ln}.weight"], ours[f"{dst}.{ln}.bias"] = gpt2[f"{src}.{ln}.weight"], gpt2[f"{src}.{ln}.bias"]
        # Conv1D's [D, 3D] weight holds q, k, v as column blocks; nn.Linear wants [out, in].
        for name, weight, bias in zip(("wq", "wk", "wv"), gpt2[f"{src}.attn.c_attn.weight"].t().chunk(3, dim=0),
                                      gpt2[f"{src}.attn.c_attn.bias"].chunk(3)):
            ours[f"{dst}.attn.{name}.weight"], ours[f"{dst}.attn.{name}.bias"] = weight, bias  # [D, D], [D]
        for gpt2_name, ours_name in (("attn.c_proj", "attn.wo"), ("mlp.c_fc", "mlp.fc_in"),
                                     ("mlp.c_proj", "mlp.fc_out")):
            ours[f"{dst}.{ours_name}.weight"] = gpt2[f"{src}.{gpt2_name}.weight"].t()  # [out, in]
            ours[f"{dst}.{ours_name}.bias"] = gpt2[f"{src}.{gpt2_name}.bias"]
    ours["norm.weight"], ours["norm.bias"] = gpt2["transformer.ln_f.weight"], gpt2["transformer.ln_f.bias"]
    return {name: tensor.detach().float().contiguous().clone() for name, tensor in ours.items()}


def fresh_adam_state(model: GPT) -> dict[str, torch.Tensor]:
    """Adam's state before its first step, flattened by parameter name as ``STATE_DICT_OPTIONS`` saves it."""
    state = {}
    for name, param in model.named_parameters():
        state[f"state.{name}.step"] = torch.tensor(0.0)
        state[f"state.{name}.exp_avg"] = torch.zeros_like(param)
        state[f"state.{name}.exp_avg_sq"] = torch.zeros_like(param)
    return state


def import_hf(folder: str, run_dir: str, *, pad_vocab_multiple: int = 1) -> str:
    """Convert the GPT-2 folder ``folder`` into ``run_dir/checkpoints/step_00000000``; returns its path."""
    from transformers import GPT2LMHeadModel

    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"import-hf: IN {folder!r} has no config.json (expected a transformers GPT-2 folder)")
    with open(config_path, encoding="utf-8") as handle:
        hf_config = json.load(handle)
    errors = unsupported_settings(hf_config)
    if pad_vocab_multiple < 1:
        errors.append(f"import-hf: --pad-vocab-multiple must be >= 1, got {pad_vocab_multiple}")
    if errors:
        raise UserError(f"import-hf: {folder!r} cannot be imported:\n  " + "\n  ".join(errors))
    checkpoints = os.path.join(os.path.abspath(run_dir), "checkpoints")
    final = os.path.join(checkpoints, CHECKPOINT_NAME)
    if os.path.isdir(checkpoints) and any(n.startswith("step_") for n in os.listdir(checkpoints)):
        raise UserError(f"import-hf: OUT_RUN_DIR {run_dir!r} already holds checkpoints in {checkpoints}; "
                         f"import into a new run folder")
    tokenizer = _read_tokenizer(folder)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if hf_config["vocab_size"] != vocab_size:
        raise UserError(f"import-hf: config.json vocab_size {hf_config['vocab_size']} differs from the tokenizer's "
                         f"{vocab_size} tokens; gptforge sizes the embedding by the tokenizer")
    gpt2 = GPT2LMHeadModel.from_pretrained(folder, local_files_only=True).float()
    if not torch.equal(gpt2.lm_head.weight, gpt2.transformer.wte.weight):
        raise UserError(f"import-hf: {folder!r} has an output layer of its own (tie_word_embeddings false); "
                         f"gptforge ties it to the token embedding")
    config = gptforge_config(hf_config, vocab_size, pad_vocab_multiple)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.load_state_dict(gptforge_state_dict(gpt2.state_dict(), config), strict=True)

    with tempfile.TemporaryDirectory() as scratch:  # the tokenizer file, copied into the checkpoint
        tokenizer_path = os.path.join(scratch, TOKENIZER_FILES["byte-bpe"])
        tokenizer.save(tokenizer_path)
        state = {"step": 0, "tokens_seen": 0, "consumed_samples": 0, "mlflow_run_id": None, "world_size": 1,
                 "scaler": None, "config": None, "tokenizer_sha256": Tokenizer(tokenizer_path).sha256,
                 "weights_only": True, "imported_from": os.path.abspath(folder)}
        # The model config and shape join ``state``; Adam's zero moments serve DeepSpeed's reader.
        return write_model_checkpoint(final, model, tokenizer_path, state, optim_state=fresh_adam_state(model))
