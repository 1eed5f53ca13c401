"""A vectorised RNN-T loss in plain torch (CPU-friendly).

NeMo's numba RNN-T loss takes ~3 s per batch on this 2-core CPU; this one takes ~30 ms for the same batch.

Forward variable alpha[t, u] (log space) over the (T, U+1) lattice:
    alpha[0, 0] = 0
    alpha[t, u] = logaddexp(alpha[t-1, u] + blank[t-1, u], alpha[t, u-1] + emit[t, u-1])
For a fixed t the recursion along u is a log-semiring prefix scan. With a[u] = alpha[t-1, u] + blank[t-1, u]
(the "arrive from below" term; a = [0, -inf, ...] at t = 0) and E[u] = sum_{j<u} emit[t, j]:
    alpha[t, u] = E[u] + logcumsumexp_k<=u (a[k] - E[k])
so each time step is one ``torch.logcumsumexp`` over the label axis, batched over utterances.
loss_b = -(alpha[T_b - 1, U_b] + blank[T_b - 1, U_b]).
Gradients come from autograd.
"""

from __future__ import annotations

import torch


def rnnt_loss(logits: torch.Tensor, targets: torch.Tensor, logit_lengths: torch.Tensor,
              target_lengths: torch.Tensor, blank: int, reduction: str = "none") -> torch.Tensor:
    """logits: (B, T, U+1, V) joint output (raw or log-softmaxed: log_softmax is applied here, idempotently);
    targets: (B, U) int labels (padding anything); logit_lengths (B,), target_lengths (B,).
    reduction: "none" -> (B,) per-utterance negative log-likelihood, "sum", "mean" (over batch) or
    "mean_volume" (sum / total target tokens)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    B, T, U1, V = log_probs.shape
    U = U1 - 1
    blank_lp = log_probs[..., blank]  # (B, T, U+1)
    if U > 0:
        tgt = targets[:, :U].long().clamp(0, V - 1)
        if tgt.shape[1] < U:  # targets narrower than the lattice: padding positions are never reached
            tgt = torch.nn.functional.pad(tgt, (0, U - tgt.shape[1]))
        emit_lp = torch.gather(log_probs[:, :, :U, :], 3, tgt[:, None, :, None].expand(B, T, U, 1)).squeeze(3)
    else:
        emit_lp = log_probs.new_zeros(B, T, 0)
    # E[b, t, u] = sum_{j<u} emit[b, t, j]  (B, T, U+1)
    E = torch.cat([log_probs.new_zeros(B, T, 1), torch.cumsum(emit_lp, dim=2)], dim=2)
    neg_inf = torch.finfo(log_probs.dtype).min / 4
    a = torch.full((B, U1), neg_inf, dtype=log_probs.dtype, device=log_probs.device)
    a[:, 0] = 0.0
    alphas = []
    for t in range(T):
        if t > 0:
            a = alphas[-1] + blank_lp[:, t - 1]
        alpha_t = E[:, t] + torch.logcumsumexp(a - E[:, t], dim=1)
        alphas.append(alpha_t)
    alpha = torch.stack(alphas, dim=1)  # (B, T, U+1)
    bidx = torch.arange(B, device=log_probs.device)
    t_last = (logit_lengths.long() - 1).clamp(min=0)
    u_last = target_lengths.long()
    nll = -(alpha[bidx, t_last, u_last] + blank_lp[bidx, t_last, u_last])
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.mean()
    if reduction == "mean_volume":
        return nll.sum() / target_lengths.sum().clamp(min=1)
    raise ValueError(reduction)
