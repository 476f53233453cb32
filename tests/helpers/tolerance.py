"""Tolerances for comparing a parallel layout with the one-process computation it replaces.

A layout computes the same sums as one process, but split over ranks and added in another order (a
row-parallel matmul adds two half-sums, FSDP adds micro-batch gradients as they arrive, a vocabulary-
parallel loss adds two halves of its exponentials). Floating-point addition is not associative, so the
results differ by rounding, and a test comparing them needs a tolerance that a correct layout cannot
exceed but that stays far below what a bug changes. The functions here derive one from the shapes.

**One sum.** However n numbers are added (one after another, pairwise, in blocks, around a ring), each
passes through at most n - 1 roundings, so |fl(s) - s| <= gamma_{n-1} * sum|x_i| with
gamma_n = n u / (1 - n u) and u = 2^-24 in fp32 (Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed. 2002, Lemma 3.1 and eq. (4.4)). That worst case needs all n - 1 rounding errors to
have the same sign and their largest size. In the probabilistic model of Higham & Mary ("A New
Approach to Probabilistic Rounding Error Analysis", SIAM J. Sci. Comput. 41(5), 2019, section 3) the
rounding errors are independent with mean zero, and then |fl(s) - s| <= gamma~_{n-1}(lam) * sum|x_i|
with gamma~_n(lam) = exp(lam sqrt(n) u + n u^2 / (1 - u)) - 1 ~ lam sqrt(n) u, with probability at least
1 - 2n exp(-lam^2 (1 - u)^2 / 2) (their proof applies the Azuma-Hoeffding inequality to the sum of the
errors). Both bounds hold, so the smaller does: the worst case below n = lam^2 terms, the probabilistic
one above. Two evaluation orders are each within the bound of the exact sum, hence within twice the
bound of each other: that is what ``reduction_tolerance`` returns.

Why the probabilistic bound: a loss depends on thousands of reductions, and their worst cases add up
linearly. For the 4-layer test model of tests/test_parallel.py the first-order worst case over all of
its matmuls is 8e-5 of the loss, the size of what a swapped tensor-parallel shard does to it (5e-4),
whereas the same rounding errors combined in quadrature, as the model implies, bound it at 2e-7. We
take lam = 6: exp(-lam^2 / 2) = 1.5e-8, so even over every reduction of a test the bound fails with a
probability far below that of any other cause.

**Through a model** (``loss_rounding_tolerance``). To first order in u, every rounding error e of a
forward pass moves the loss by c_e * delta_e, |delta_e| <= u, where c_e is the derivative of the loss
with respect to the rounded value times the value; for the k-th addition of a reduction the value is a
partial sum, at most the sum of the absolute terms. Backpropagation gives every derivative at once, so
the bound lam * u * sqrt(sum c_e^2) is computed from one forward and backward of the one-process model.

**Through training** (``adam_drift_tolerance``). After a step the two runs' weights differ by what
AdamW makes of their gradients' difference. Adam's update m^ / (sqrt(v^) + eps) is at most C_t in size
(Cauchy-Schwarz on the bias-corrected averages: 1.004 after 6 steps, below 1.17 ever, for beta1 = 0.9
and beta2 = 0.95; Kingma & Ba, "Adam", ICLR 2015, section 2.1, bound the step by about lr likewise), and
a gradient difference dg moves m^ by at most C_t |dg| and sqrt(v^) by at most |dg|, so the update by at
most 2 C_t |dg| / sqrt(v^). Weight i thus moves by at most 2 C lr |dg_i| / sqrt(v^_i) more in one run
than in the other, and the loss at a later step, whose gradient g_i is of the size sqrt(v^_i) of the
recent gradients, changes by sum_i g_i dw_i <= 2 C lr sum_i |dg_i|: the gradient's own size cancels, so
elements whose gradients are tiny and badly conditioned (Adam turns their rounding noise into lr-sized
steps) matter no more than others. With independent rounding the sum over elements adds in
quadrature: 2 C lr ||dg||_2 = 2 C lr rho ||g||_2 per step, rho the gradients' relative difference.
This is first order: the weights' difference also feeds into later gradients, which it leaves out;
injecting relative gradient noise of 1e-4 to 1e-2 into the one-process run of tests/test_parallel.py
moves its losses at steps 2-4 by at most 0.3 of the bound's one-standard-deviation version (lam = 1).
Weight decay adds lr * wd * dw, a relative 3e-4 more; gradient clipping multiplies both runs' gradients
by the same factor, which Adam's update does not see.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

LAMBDA = 6.0
"""How many 'standard deviations' the probabilistic bounds allow (see the module docstring)."""


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """u: half the distance from 1 to the next number (2^-24 fp32, 2^-8 bf16, 2^-11 fp16)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's worst-case gamma_n = n u / (1 - n u): the relative error of n roundings."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"gamma_{n} does not exist for {dtype}: n u = {nu} >= 1")
    return nu / (1 - nu)


def gamma_probabilistic(n: int, dtype: torch.dtype = torch.float32, safety: float = LAMBDA) -> float:
    """Higham & Mary's gamma~_n(lam) = exp(lam sqrt(n) u + n u^2 / (1 - u)) - 1 ~ lam sqrt(n) u."""
    u = unit_roundoff(dtype)
    return math.expm1(safety * math.sqrt(n) * u + n * u * u / (1 - u))


def reduction_tolerance(n_terms: int, magnitude, dtype: torch.dtype = torch.float32, safety: float = LAMBDA):
    """The largest difference between two evaluation orders of a sum of ``n_terms`` terms whose absolute
    values average ``magnitude`` (a float, or a tensor for a bound per element): twice
    min(gamma_{n-1}, gamma~_{n-1}(safety)) times the sum of the absolute terms, n_terms * magnitude."""
    additions = max(n_terms - 1, 0)
    relative = min(gamma(additions, dtype), gamma_probabilistic(additions, dtype, safety))
    return 2 * relative * n_terms * magnitude


def chain_relative_tolerance(n_reductions: int, inner_dim: int, dtype: torch.dtype = torch.float32,
                             output_dtype: torch.dtype | None = None, safety: float = LAMBDA) -> float:
    """Relative difference, between two evaluation orders, of a value computed through ``n_reductions``
    successive reductions of ``inner_dim`` terms each (accumulated in ``dtype``, each result rounded to
    ``output_dtype``, default ``dtype``), to first order.

    Terms of random sign (products of activations and weights) add up to about sqrt(d) times their
    size, so sum|x_i| is about sqrt(d) |s| and one reduction's probabilistic bound is lam sqrt(d) u *
    sqrt(d) |s| = lam d u |s|, plus lam u_out |s| for rounding the result. Relative errors pass along the
    chain with unit gain (LayerNorm and softmax are scale-free, residual additions average them), and
    the reductions' independent errors add in quadrature."""
    u, u_out = unit_roundoff(dtype), unit_roundoff(output_dtype or dtype)
    per_reduction = math.hypot(inner_dim * u, u_out)
    return 2 * safety * math.sqrt(n_reductions) * per_reduction


def adam_step_bound(steps: int, beta1: float = 0.9, beta2: float = 0.95) -> float:
    """max over t <= steps of C_t = sqrt(sum_j c_j^2 / d_j), the bound on |m^ / sqrt(v^)| after t steps,
    with m^ = sum_j c_j g_j and v^ = sum_j d_j g_j^2 (bias-corrected weights; Cauchy-Schwarz)."""
    best = 0.0
    for t in range(1, steps + 1):
        c = [(1 - beta1) * beta1 ** (t - j) / (1 - beta1 ** t) for j in range(1, t + 1)]
        d = [(1 - beta2) * beta2 ** (t - j) / (1 - beta2 ** t) for j in range(1, t + 1)]
        best = max(best, math.sqrt(sum(ci * ci / di for ci, di in zip(c, d))))
    return best


def adam_drift_tolerance(lrs, grad_norms, rel_grad_error: float, beta1: float = 0.9,
                         beta2: float = 0.95) -> float:
    """How much the loss after the AdamW steps with learning rates ``lrs`` and gradient norms
    ``grad_norms`` (before clipping) can differ between two runs whose gradients differ by
    ``rel_grad_error`` of their norm at every step: 2 C sum_j lr_j rho |g_j| (module docstring)."""
    lrs, grad_norms = list(lrs), list(grad_norms)
    if len(lrs) != len(grad_norms):
        raise ValueError(f"{len(lrs)} learning rates but {len(grad_norms)} gradient norms")
    if not lrs:
        return 0.0
    step_bound = adam_step_bound(len(lrs), beta1, beta2)
    return 2 * step_bound * sum(lr * rel_grad_error * norm for lr, norm in zip(lrs, grad_norms))


# ----------------------------------------------------------------------------------- through a model


@dataclass(kw_only=True)
class _Budget:
    """Accumulates sum_e (c_e u_e)^2 over the rounding errors e of a forward pass (module docstring)."""

    u: float
    """Unit roundoff of the accumulations (fp32: CPU matmuls accumulate in fp32 for every dtype)."""
    u_out: float
    """Unit roundoff of every stored result (bf16 when the compute runs in bf16)."""
    variance: float = 0.0
    hooks: list = field(default_factory=list)

    def reduction(self, out: torch.Tensor, abs_sum: torch.Tensor, n_terms: int) -> None:
        """``out`` = a reduction of ``n_terms`` terms per element whose absolute values add to
        ``abs_sum``: n_terms additions with partial sums <= abs_sum, then one rounding of the result."""
        abs_sum, result = abs_sum.detach(), out.detach()

        def on_grad(grad: torch.Tensor) -> None:
            self.variance += float(n_terms * self.u ** 2 * (grad * abs_sum).square().sum()
                                   + self.u_out ** 2 * (grad * result).square().sum())

        out.register_hook(on_grad)

    def rounding(self, out: torch.Tensor, events: int = 1) -> None:
        """``events`` elementwise roundings of ``out`` (residual additions)."""
        result = out.detach()

        def on_grad(grad: torch.Tensor) -> None:
            self.variance += float(events * self.u_out ** 2 * (grad * result).square().sum())

        out.register_hook(on_grad)

    def row_sum(self, out: torch.Tensor, coefficient: torch.Tensor, n_terms: int) -> None:
        """A reduction of ``n_terms`` terms that every element of a row of ``out`` depends on (a
        softmax denominator, a LayerNorm statistic): each of its roundings moves ``out[..., j]`` by at
        most ``coefficient[..., j]`` times its relative error, the same error for the whole row."""
        result = coefficient.detach()

        def on_grad(grad: torch.Tensor) -> None:
            self.variance += float(n_terms * self.u ** 2 * (grad * result).sum(-1).square().sum())

        out.register_hook(on_grad)


def _traced_attention(budget: _Budget):
    """scaled_dot_product_attention written out, recording its three reductions."""

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        if dropout_p:
            raise ValueError("loss_rounding_tolerance: dropout makes the forward random; use dropout 0")
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        scores = q @ k.transpose(-2, -1) * scale  # [B, H, T, S], head_dim terms each
        budget.reduction(scores, q.abs() @ k.abs().transpose(-2, -1) * scale, q.shape[-1])
        if is_causal:
            attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = probs @ v  # [B, H, T, Dh], S terms each
        # S additions, and S exponentials each rounded once, with coefficients <= probs @ |v|
        budget.reduction(out, probs @ v.abs(), 2 * k.shape[-2])
        # the softmax denominator, S positive terms (partial sums <= the sum): its relative error
        # scales the whole output row
        budget.row_sum(out, out, k.shape[-2])
        return out

    return attention


def _trace_modules(model: nn.Module, budget: _Budget) -> None:
    def linear(module, args, out):
        x = args[0].detach()
        bias = module.bias.detach().abs() if module.bias is not None else None
        budget.reduction(out, F.linear(x.abs(), module.weight.detach().abs(), bias),
                         module.in_features + (bias is not None))

    def layer_norm(module, args, out):
        x = args[0].detach()  # [..., d]
        std = (x.var(-1, unbiased=False, keepdim=True) + module.eps).sqrt()
        weight = module.weight.detach() if module.weight is not None else torch.ones_like(x[..., :1])
        shifted = out - module.bias.detach() if module.bias is not None else out
        d = x.shape[-1]
        # the variance, d positive terms: its relative error e moves the output by -e/2 (out - bias)
        budget.row_sum(out, -0.5 * shifted, d)
        # the mean, d terms of either sign (partial sums <= sum|x|): moves the output by -error * weight / std
        budget.row_sum(out, x.abs().mean(-1, keepdim=True) * weight / std, d)
        budget.rounding(out, events=2)  # the normalisation and the affine map

    def head(module, args, out):
        hidden, weight = args[0].detach(), args[1].detach()
        budget.reduction(out, F.linear(hidden.abs(), weight.abs()), hidden.shape[-1])

    def residual(module, args, out):
        budget.rounding(out, events=2)  # the attention and the MLP residual additions

    for module in model.modules():
        if isinstance(module, nn.Linear):
            budget.hooks.append(module.register_forward_hook(linear))
        elif isinstance(module, nn.LayerNorm):
            budget.hooks.append(module.register_forward_hook(layer_norm))
    budget.hooks.append(model.lm_head.register_forward_hook(head))
    blocks = list(model.blocks.values())
    for block in blocks:
        budget.hooks.append(block.register_forward_hook(residual))
    # the token and position embeddings' sum, rounded once
    budget.hooks.append(blocks[0].register_forward_pre_hook(lambda module, args: budget.rounding(args[0])))


def loss_rounding_tolerance(model: nn.Module, batches, output_dtype: torch.dtype = torch.float32,
                            safety: float = LAMBDA) -> float:
    """The largest difference, between two evaluations that order their reductions differently, of the
    mean token loss of ``model`` (a one-process gptforge GPT) over ``batches`` (tokens, labels,
    loss_mask), each [B, T]: sum of the batches' fp32 loss sums / their tokens, as training and
    validation compute it. With ``output_dtype`` bfloat16 also every stored result is rounded to 16 bits
    (accumulations stay fp32), in both evaluations independently.

    Counted, per element of every result: each matmul's additions and its rounding (nn.Linear, the
    tied head, attention's scores and probabilities x values), the softmax denominators, LayerNorm's
    mean and variance, the residual additions, each token's log-sum-exp over the vocabulary, and the
    fp32 sums of the tokens' losses and of the micro-batches' sums; in 16 bits also the rounding of
    every parameter. Returns an absolute bound."""
    budget = _Budget(u=unit_roundoff(torch.float32), u_out=unit_roundoff(output_dtype))
    n_tokens = float(sum(float(mask.sum()) for _, _, mask in batches))
    was_training = model.training
    model.eval()
    _trace_modules(model, budget)
    sums = []
    try:
        with _patched(F, "scaled_dot_product_attention", _traced_attention(budget)):
            for tokens, labels, mask in batches:
                logits = model(tokens).float()  # [B, T, V]
                vocab = logits.shape[-1]
                losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")  # [B*T]
                weight = mask.flatten().to(losses.dtype) / n_tokens
                # log-sum-exp: a sum of V positive exponentials whose relative error is the loss's error,
                # then the logarithm and the label's logit subtracted, one rounding each
                budget.variance += budget.u ** 2 * float(vocab * weight.square().sum()
                                                         + 2 * (weight * losses.detach()).square().sum())
                # the fp32 sum of B*T token losses: partial sums <= the sum
                total = float((losses.detach() * weight).sum())
                budget.variance += losses.numel() * budget.u ** 2 * total ** 2
                sums.append(total)
                (losses * weight).sum().backward()
        # micro-batch sums added in fp32 (pipelines) or fp64 (the rest): n_micro positive terms
        budget.variance += len(sums) * budget.u ** 2 * sum(sums) ** 2
        if budget.u_out > budget.u:  # 16-bit compute: each run may round every parameter to 16 bits
            budget.variance += budget.u_out ** 2 * sum(float((p.grad * p.detach()).square().sum())
                                                      for p in model.parameters() if p.grad is not None)
    finally:
        for hook in budget.hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return 2 * safety * math.sqrt(budget.variance)


@contextlib.contextmanager
def _patched(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)
