"""CPU training throughput: gptforge's GPT against transformers' GPT2LMHeadModel of the same shape.

Same batch, same sequence length, fp32, AdamW, dropout 0, forward + backward + optimizer step. The two
models alternate trial by trial in one process so machine noise hits both alike; the result is the
ratio of median tokens/s (absolute CPU times are not meant to be compared across machines).

    .venv/bin/python bench/cpu_train_throughput.py --preset gpt3-125m --seq 256 --batch 4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F


def build_ours(preset: str, seq: int):
    from gptforge.model import build_model, get_preset

    config = get_preset(preset).config(dropout=0.0, context_length=max(seq, 1))
    model = build_model(config, seed=0)

    def loss_fn(x, y):
        logits = model(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    return model, loss_fn, config


def build_hf(config):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(
        vocab_size=config.padded_vocab_size, n_positions=config.context_length, n_embd=config.d_model,
        n_layer=config.n_layer, n_head=config.n_head, n_inner=config.ffn_dim, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=config.layer_norm_eps,
        tie_word_embeddings=True,
    )
    hf_config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(hf_config)

    def loss_fn(x, y):
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    return model, loss_fn


def time_steps(model, loss_fn, x, y, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    start = time.perf_counter()
    for _ in range(steps):
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt3-125m")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per trial")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    ours, ours_loss, config = build_ours(args.preset, args.seq)
    hf, hf_loss = build_hf(config)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    y = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    for model, fn in ((ours, ours_loss), (hf, hf_loss)):  # warm-up: allocator, kernels, optimizer state
        time_steps(model, fn, x, y, 1)
    tokens = args.batch * args.seq * args.steps
    results = {"gptforge": [], "transformers": []}
    for _ in range(args.trials):
        results["gptforge"].append(tokens / time_steps(ours, ours_loss, x, y, args.steps))
        results["transformers"].append(tokens / time_steps(hf, hf_loss, x, y, args.steps))
    med = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "preset": args.preset, "seq": args.seq, "batch": args.batch, "steps_per_trial": args.steps,
        "trials": args.trials, "params_gptforge": n_ours, "params_transformers": n_hf,
        "tokens_per_s_median": med, "ratio_gptforge_over_transformers": med["gptforge"] / med["transformers"],
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
