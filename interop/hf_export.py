"""``gptforge export-hf CHECKPOINT OUT``: a checkpoint -> a Hugging Face ``transformers`` GPT-2 folder.

The folder (``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer files,
``README.md``) loads offline with ``GPT2LMHeadModel``/``GPT2Model.from_pretrained``, ``AutoTokenizer``
and ``pipeline("text-generation")``, and computes the same logits as gptforge.

Our block is GPT-2's block with other names: separate q/k/v ``nn.Linear`` layers where GPT-2 has one
fused ``c_attn`` ``Conv1D`` (which stores its weight as [in, out], the transpose of ``nn.Linear``),
the same tanh GELU, the same pre-LN layout and final LayerNorm, and the head tied to the token
embedding. Only the real ``vocab_size`` embedding rows are exported (ours are padded to
``padded_vocab_size``). Settings GPT-2 cannot express are refused before anything is written;
``bias: false`` is exported exactly, as zero biases.

The folder is written under ``.tmp-OUT`` beside OUT, checked (the exported model's logits are compared
with ours on a few sequences) and only then renamed to OUT, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os

import torch

from ..common.errors import UserError
from ..common.atomic import atomic_folder
from ..data_prep.tokenization.tokenizer import Tokenizer
from .hf_tokenizer import write_hf_tokenizer
from ..model.config import GPTConfig
from ..model.gpt import GPT

VERIFY_ATOL = 1e-4  # fp32 logits of the same computation in another summation order


def unsupported_settings(config: GPTConfig) -> list[str]:
    """Why GPT-2's architecture cannot hold a model of ``config`` (empty when it can)."""
    errors = []
    if config.attention_pattern != "dense":
        errors.append(f"model.attention_pattern is {config.attention_pattern!r} (GPT-3's locally banded layers): "
                      f"GPT-2 attends densely in every layer, so the exported model would compute other logits")
    if config.norm_position != "pre":
        errors.append(f"model.norm_position is {config.norm_position!r} (GPT-1's LayerNorm after each residual "
                      f"add): GPT-2 only has LayerNorm at the input of each sub-block")
    if not config.final_norm:
        errors.append("model.final_norm is false: GPT-2 always applies a final LayerNorm (ln_f)")
    return errors


def gpt2_config(config: GPTConfig, eod: int) -> dict:
    """``config.json`` fields of ``transformers.GPT2Config`` for ``config``."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.context_length, "n_embd": config.d_model,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.ffn_dim,
        "activation_function": "gelu_new",  # the tanh approximation, as in model/gpt.py
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps, "initializer_range": config.init_std,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "bos_token_id": eod, "eos_token_id": eod, "use_cache": True,
    }


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names (``GPT2LMHeadModel``'s ``transformer.`` prefix), as contiguous
    tensors of their own. The tied ``lm_head.weight`` is left out: ``transformers`` ties it on load."""
    cfg = model.config
    ours = model.state_dict()

    def bias(name: str, size: int) -> torch.Tensor:
        # bias: false -> zero biases: the same function under GPT-2's always-biased layers.
        return ours[name] if name in ours else torch.zeros(size, dtype=ours["tok_embeddings.weight"].dtype)

    def layer_norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = ours[f"{src}.weight"]
        out[f"{dst}.bias"] = bias(f"{src}.bias", cfg.d_model)

    out = {"transformer.wte.weight": ours["tok_embeddings.weight"][: cfg.vocab_size],  # [V, D], padding dropped
           "transformer.wpe.weight": ours["pos_embeddings.weight"]}  # [T, D]
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}", f"transformer.h.{i}"
        layer_norm(f"{src}.ln_1", f"{dst}.ln_1")
        layer_norm(f"{src}.ln_2", f"{dst}.ln_2")
        qkv = [f"{src}.attn.{w}" for w in ("wq", "wk", "wv")]
        # Conv1D computes x @ W + b with W [in, out]: the fused [D, 3D] holds q, k, v columns in that order.
        out[f"{dst}.attn.c_attn.weight"] = torch.cat([ours[f"{n}.weight"] for n in qkv], dim=0).t()  # [D, 3D]
        out[f"{dst}.attn.c_attn.bias"] = torch.cat([bias(f"{n}.bias", cfg.d_model) for n in qkv])  # [3D]
        for ours_name, gpt2_name, width in (("attn.wo", "attn.c_proj", cfg.d_model),
                                            ("mlp.fc_in", "mlp.c_fc", cfg.ffn_dim),
                                            ("mlp.fc_out", "mlp.c_proj", cfg.d_model)):
            out[f"{dst}.{gpt2_name}.weight"] = ours[f"{src}.{ours_name}.weight"].t()  # [in, out]
            out[f"{dst}.{gpt2_name}.bias"] = bias(f"{src}.{ours_name}.bias", width)
    layer_norm("norm", "transformer.ln_f")
    return {name: tensor.detach().contiguous().clone() for name, tensor in out.items()}


def _readme(out: str, checkpoint: str, state: dict, config: GPTConfig, tokenizer_section: str) -> str:
    progress = ", ".join(f"{label} {state[key]}" for key, label in (("step", "step"), ("tokens_seen", "tokens seen"))
                         if state.get(key) is not None)
    return (f"# GPT-2-architecture model exported by gptforge\n\n"
            f"From checkpoint `{os.path.abspath(checkpoint)}` ({progress or 'no training progress recorded'}): "
            f"{config.n_layer} layers, d_model {config.d_model}, "
            f"{config.n_head} heads, context {config.context_length}, vocabulary {config.vocab_size}.\n\n"
            f"```python\nfrom transformers import pipeline\n"
            f"generate = pipeline(\"text-generation\", model=\"{out}\")\n```\n\n"
            f"{tokenizer_section}")


@torch.no_grad()
def verify_export(folder: str, model: GPT, *, atol: float = VERIFY_ATOL, seed: int = 0) -> float:
    """Max |logit difference| between ``folder`` loaded by ``transformers`` and ``model`` on random
    token sequences (fp32); raises ValueError above ``atol``."""
    from transformers import GPT2LMHeadModel

    cfg = model.config
    hf = GPT2LMHeadModel.from_pretrained(folder, local_files_only=True).float().eval()
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (2, min(cfg.context_length, 32)), generator=generator)  # [B, T]
    ours = model(tokens)[..., : cfg.vocab_size].float()  # [B, T, V]
    theirs = hf(tokens).logits.float()  # [B, T, V]
    diff = float((ours - theirs).abs().max())
    if not diff <= atol:
        raise ValueError(f"export-hf: the exported model's logits differ from the checkpoint's by {diff:.3g} "
                         f"(> {atol}); nothing was written")
    return diff


def export_hf(checkpoint: str, out: str, *, overwrite: bool = False, verify: bool = True) -> str:
    """Export ``checkpoint`` (a step folder, checkpoints folder or run folder) to the folder ``out``."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from ..training.trained_model import load_trained_model

    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise UserError(f"export-hf: OUT {out!r} already exists; pass --overwrite to replace it")
    trained = load_trained_model(checkpoint)
    errors = unsupported_settings(trained.config)
    if errors:
        raise UserError(f"export-hf: checkpoint {trained.checkpoint!r} cannot be exported as GPT-2:\n  "
                         + "\n  ".join(errors))
    eod = Tokenizer(trained.tokenizer_path).eod
    # With --overwrite the old folder goes only once the new one is complete and verified.
    with atomic_folder(out) as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as handle:
            dtype = str(trained.model.tok_embeddings.weight.dtype).removeprefix("torch.")
            json.dump(gpt2_config(trained.config, eod) | {"dtype": dtype}, handle, indent=2)
        GenerationConfig(bos_token_id=eod, eos_token_id=eod).save_pretrained(tmp)
        save_file(gpt2_state_dict(trained.model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tokenizer_section = write_hf_tokenizer(trained.tokenizer_path, tmp,
                                               context_length=trained.config.context_length)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(_readme(out, trained.checkpoint, trained.state, trained.config, tokenizer_section))
        if verify:
            verify_export(tmp, trained.model)
    return out
