"""Attention kernels: the explicit softmax attention and the shared-prefix attention.

`math_attention` is softmax(q·kᵀ·scaling + mask)·v written out, differentiable in both AD modes
(SDPA has no forward-mode derivative on CPU, so LinGD needs it). `prefix_attention` lets a batch
of queries attend to one batch-1 cache of demonstrations without copying it per example: where
nothing masks the prefix it runs the prefix part as one fused flash-attention call and merges it
with the chunk's own keys by log-sum-exp; otherwise it builds the scores explicitly. Both equal
the model's own attention (tests/test_capture.py). `capture.iclgd_attention` decides which runs.

Shapes: query [batch, head, q, d_head]; key/value [batch, kv_head, k_pos, d_head] (grouped-query
heads share a key/value head); masks as transformers passes them to an attention function.
"""

from __future__ import annotations

import torch

from iclgd.errors import IclgdError


def _expand_kv(key: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[batch, kv_head, k_pos, d_head] -> [batch, head, k_pos, d_head] (grouped-query heads)."""
    groups = n_heads // key.shape[1]
    return key if groups == 1 else key.repeat_interleave(groups, dim=1)


def _mask_scores(scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Apply the model's mask to scores [batch, head, q, k_pos].

    `attention_mask` is what transformers passes to the attention function: None (plain causal,
    the q rows being the last q keys), a boolean [batch, 1, q, k_pos] (True = attend), or an
    additive float mask of that shape.
    """
    q, k = scores.shape[-2:]
    if attention_mask is None:
        rows = torch.arange(q, device=scores.device)[:, None] + (k - q)  # [q, 1]
        allowed = torch.arange(k, device=scores.device)[None, :] <= rows  # [q, k_pos]
        return scores.masked_fill(~allowed, float("-inf"))
    m = attention_mask[..., -k:]
    if m.dtype == torch.bool:
        return scores.masked_fill(~m, float("-inf"))
    return scores + m


def math_attention(
    query: torch.Tensor,  # [batch, head, q, d_head]
    key: torch.Tensor,  # [batch, kv_head, k_pos, d_head]
    value: torch.Tensor,  # [batch, kv_head, k_pos, d_head]
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """softmax(q·kᵀ·scaling + mask)·v, differentiable in both AD modes. Returns [batch, q, head, d_head]."""
    n_heads = query.shape[1]
    scores = query @ _expand_kv(key, n_heads).transpose(-1, -2) * scaling  # [batch, head, q, k_pos]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = _mask_scores(scores, attention_mask)
    dead = _dead_rows(attention_mask)
    if dead is not None:  # see _dead_rows
        scores = scores.masked_fill(dead, 0.0)
    probs = torch.softmax(scores, dim=-1)
    if dead is not None:
        probs = probs.masked_fill(dead, 0.0)
    out = probs @ _expand_kv(value, n_heads)  # [batch, head, q, d_head]
    return out.transpose(1, 2).contiguous()


def _dead_rows(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[batch, 1, q, 1] True where a query row may attend to no key at all, or None if none is.

    A right-padded query past the end of its example, in a sliding-window layer, sees only
    padding keys. SDPA (torch >= 2.5) gives such a row a zero output; a plain softmax gives NaN,
    and the NaN then reaches every row of the next layer through 0·NaN in probs·v. The rows are
    never read, so they get SDPA's zeros here too."""
    if attention_mask is None:
        return None
    open_ = attention_mask if attention_mask.dtype == torch.bool else attention_mask > torch.finfo(attention_mask.dtype).min / 2
    dead = ~open_.any(-1, keepdim=True)
    return dead if bool(dead.any()) else None


def prefix_attention(
    query: torch.Tensor,  # [batch, head, q, d_head]
    key: torch.Tensor,  # [batch, kv_head, q, d_head]: the chunk's own keys
    value: torch.Tensor,  # [batch, kv_head, q, d_head]
    prefix: tuple[torch.Tensor, torch.Tensor],  # keys, values [1, kv_head, p, d_head], shared by the batch
    attention_mask: torch.Tensor | None,  # None, or bool/additive [batch, 1, q, p + q]
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention over [shared prefix | own keys] without copying the prefix per example.

    Equals `math_attention` on the prefix repeated along the batch and concatenated with the
    chunk's keys (tested). Where every query sees every prefix key (no sliding window cuts the
    prefix) and there is no softcapping, the prefix part runs as one fused flash-attention call
    (`_prefix_attention_flash`); otherwise the scores are built explicitly. Returns
    [batch, q, head, d_head].
    """
    b, n_heads, q_len, d = query.shape
    p_len = prefix[0].shape[2]
    if attention_mask is not None and attention_mask.shape[-1] != p_len + q_len:
        raise IclgdError(
            f"shared-prefix attention got a mask over {attention_mask.shape[-1]} keys for a prefix of "
            f"{p_len} and a chunk of {q_len}; evaluate with cache_prefix=False for this model"
        )
    own_mask = None if attention_mask is None else attention_mask[..., p_len:]
    prefix_open = attention_mask is None or (
        bool(attention_mask[..., :p_len].all()) if attention_mask.dtype == torch.bool
        else bool((attention_mask[..., :p_len] == 0).all()))
    if prefix_open and softcap is None and _FLASH is not None and query.device.type == "cpu":
        return _prefix_attention_flash(query, key, value, prefix, own_mask, scaling)
    return _prefix_attention_scores(query, key, value, prefix, attention_mask, scaling, softcap, prefix_open)


# The fused CPU kernel behind SDPA; unlike the public call it also returns the log-sum-exp that
# merging two softmax parts needs. Absent (other builds), the explicit path runs instead.
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _fold_groups(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[batch, head, q, d] -> [kv_head, batch, group * q, d]: query heads sharing a key/value head
    become rows, so each key/value head is one operand for the whole batch."""
    b, n_heads, q_len, d = x.shape
    return x.reshape(b, n_kv, n_heads // n_kv * q_len, d).transpose(0, 1)


def _unfold_groups(out: torch.Tensor, b: int, n_heads: int, q_len: int) -> torch.Tensor:
    """[kv_head, batch, group * q, d] -> [batch, q, head, d]."""
    d = out.shape[-1]
    return out.transpose(0, 1).reshape(b, n_heads, q_len, d).transpose(1, 2).contiguous()


def _prefix_attention_flash(query, key, value, prefix, own_mask, scaling) -> torch.Tensor:
    """Prefix part fused (flash attention over every query row of the batch at once, returning
    its log-sum-exp), own part explicit; the two softmax parts merged exactly:
    out = (e^{lse_p - m}·out_p + Σ e^{s - m}·v) / (e^{lse_p - m} + Σ e^{s - m})."""
    b, n_heads, q_len, _ = query.shape
    n_kv = key.shape[1]
    pk, pv = prefix
    qs = _fold_groups(query, n_kv)  # [kv, b, g*q, d]
    rows = qs.shape[2]
    out_p, lse_p = _FLASH(qs.reshape(1, n_kv, b * rows, -1), pk, pv, 0.0, False, scale=scaling)
    out_p = out_p.view(n_kv, b, rows, -1).float()  # softmax-normalized over the prefix
    lse_p = lse_p.view(n_kv, b, rows, 1).float()
    s_own = (qs @ key.transpose(0, 1).transpose(2, 3)).float() * scaling  # [kv, b, g*q, q]
    s_own = s_own.view(n_kv, b, -1, q_len, q_len)  # [kv, b, g, q, q]
    if own_mask is None:  # causal within the chunk
        r = torch.arange(q_len, device=query.device)
        s_own.masked_fill_(r[None, :] > r[:, None], float("-inf"))
    elif own_mask.dtype == torch.bool:
        s_own.masked_fill_(~own_mask[None], float("-inf"))
    else:
        s_own.add_(own_mask[None].float())
    s_own = s_own.view(n_kv, b, rows, q_len)
    m = torch.maximum(lse_p, s_own.amax(-1, keepdim=True))  # finite: the prefix is never empty
    w_p = torch.exp(lse_p - m)
    e = torch.exp(s_own - m)
    out = (w_p * out_p + e @ value.transpose(0, 1).float()) / (w_p + e.sum(-1, keepdim=True))
    return _unfold_groups(out.to(query.dtype), b, n_heads, q_len)


def _prefix_attention_scores(query, key, value, prefix, attention_mask, scaling, softcap, prefix_open):
    """The explicit shared-prefix attention: scores over [prefix | own keys], softmax, mix."""
    b, n_heads, q_len, d = query.shape
    n_kv = key.shape[1]
    pk, pv = prefix
    p_len = pk.shape[2]
    g = n_heads // n_kv
    # Layout [kv_head, batch, group * q, .]: the prefix products are one matmul per key/value
    # head with the batch folded into the rows, and the slices below stay views.
    qs = _fold_groups(query * scaling, n_kv)  # [kv, b, g*q, d]
    s_pre = (qs.reshape(n_kv, b * g * q_len, d) @ pk[0].transpose(1, 2)).view(n_kv, b, g * q_len, p_len)
    s_own = qs @ key.transpose(0, 1).transpose(2, 3)  # [kv, b, g*q, q]
    scores = torch.cat([s_pre, s_own], dim=-1).view(n_kv, b, g, q_len, p_len + q_len)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:  # every prefix key, causal within the chunk
        rows = torch.arange(q_len, device=query.device)
        scores[..., p_len:].masked_fill_(rows[None, :] > rows[:, None], float("-inf"))
    else:
        m = attention_mask[None, :, :, :, :]  # [1, b, 1, q, p + q]
        part = scores[..., p_len:] if prefix_open else scores  # usually only the chunk is masked
        m = m[..., p_len:] if prefix_open else m
        if m.dtype == torch.bool:
            part.masked_fill_(~m, float("-inf"))
        else:
            part.add_(m)
    dead = None if prefix_open else _dead_rows(attention_mask)  # an open prefix is always seen
    if dead is not None:
        scores.masked_fill_(dead[None], 0.0)
    probs = torch.softmax(scores, dim=-1)
    if dead is not None:
        probs.masked_fill_(dead[None], 0.0)
    probs = probs.view(n_kv, b * g * q_len, p_len + q_len)
    out = probs[..., :p_len] @ pv[0]  # [kv, b*g*q, d]
    out = out.view(n_kv, b, g * q_len, d) + probs[..., p_len:].view(n_kv, b, g * q_len, q_len) @ value.transpose(0, 1)
    return _unfold_groups(out, b, n_heads, q_len)
