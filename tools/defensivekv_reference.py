#!/usr/bin/env python3
"""Reference of DefensiveKV and Layer-DefensiveKV in PyTorch, written from the press spec
(shared/spec/presses.md §4 and §5) alone, to check defkv's C++ presses against.

It prefills the context once with transformers (compression never changes a prefill: each layer is
compressed after its own attention ran, §1.1), records every layer's attention input X and its
cached K, V (after RoPE and k_norm), scores every layer by §4.3 (a)-(g) in fp32, and selects:
  * DefensiveKV (§4.3 h): per layer, the top int(L·(1-cr)·H) entries of the flattened (H, L) scores;
  * Layer-DefensiveKV (§5): the top int(L·(1-cr)·H·N_L) entries over all layers at once.

Where the spec leaves a choice, this file takes the one defkv takes (spec §10): scores in fp32;
the stage-1 cap int(n·(1-cr) - w) clamped to >= 0; no max(1, .) on the budgets; the protected value
is the layer's finite S_max (which Layer-DefensiveKV's cross-layer comparison needs). Exact ties in the final top-k are broken by lower flattened index first (stable
sort), which the tests do not depend on.

Shapes (batch 1 throughout, the batch axis is dropped):
  A      [H_q, w, n]    window attention of §1.4 with the window columns dropped (n = L - w)
  A5     [H, G, w, n]   the same, grouped: query head h = g·G + h' reads kv head g
  M, S   [H, n]         defensive aggregate, and after the mean clamp
  nu     [H, n]         each kv head's share of the output-projected value norm at each token
  scores [H, L]         final layer scores; window and stage-1 entries hold the layer's S_max

Usage:
  defensivekv_reference.py --model DIR --context-file F --ratio R [--layer] [--window W]
                           [--kernel K] [--tau T] --out kept.json
The output has the keys of defkv-generate's --kept-json (press, compression_ratio,
context_tokens, kept, positions), without the answer.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import torch
import torch.nn.functional as F

TAU = 0.9  # stage-1 mass threshold, hard-coded in the reference implementation


# ------------------------------------------------------------------------------------------------
# §4.3 building blocks (also the §4.5 toy example)
# ------------------------------------------------------------------------------------------------

def pool_renormalise(rows: torch.Tensor, kernel: int) -> torch.Tensor:
    """§4.3 (c): average-pool every row along its last axis (zero padding kernel//2 on both sides,
    every output divided by kernel) and rescale the pooled row so that it keeps the row's mass."""
    if kernel % 2 != 1:
        raise ValueError(f"kernel must be odd, got {kernel}")
    shape = rows.shape
    flat = rows.reshape(-1, 1, shape[-1])
    pooled = F.avg_pool1d(flat, kernel_size=kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    pooled = pooled.reshape(shape)
    mass = rows.sum(-1, keepdim=True)
    pooled_mass = pooled.sum(-1, keepdim=True)
    scale = torch.where(pooled_mass > 0, mass / pooled_mass, torch.zeros_like(mass))
    return pooled * scale


def defensive_aggregate(a5: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """§4.3 (c)-(d). a5 [H, G, w, n] -> (M [H, n], mu [H], S [H, n]):
    M = max over the group's query heads and the window queries of the pooled renormalised rows,
    mu = mean of M over the n tokens, S = max(M, mu)."""
    pooled = pool_renormalise(a5, kernel)
    m = pooled.amax(dim=(1, 2))
    mu = m.mean(-1)
    s = torch.maximum(m, mu[:, None])
    return m, mu, s


def window_bias(a: torch.Tensor, window: int) -> float:
    """§4.3 (a): mean over query heads and window queries of the mass on the last `window`
    non-window tokens (positions n-w .. n-1; all n of them if n < w). A [H_q, w, n]."""
    n = a.shape[-1]
    return float(a[..., max(0, n - window):].sum(-1).mean())


def raw_average(a5: torch.Tensor) -> torch.Tensor:
    """§4.3 (b): mean over the group's query heads and the window queries, no pooling. [H, n]."""
    return a5.mean(dim=(1, 2))


def stage1_cap(n: int, ratio: float, window: int) -> int:
    """int(n·(1-cr) - w), truncated toward zero, clamped to >= 0 (the documented deviation)."""
    return max(0, int(n * (1.0 - ratio) - window))


def stage1_count(p: torch.Tensor, threshold: float) -> int:
    """§4.3 (f) for one head: p sums to 1. Sorted descending, the count is the 0-based index of the
    first cumulative sum that reaches `threshold` (0 if none does, as argmax of an all-false mask)."""
    order = torch.argsort(p, descending=True, stable=True)
    reached = torch.nonzero(torch.cumsum(p[order], 0) >= threshold).flatten()
    return int(reached[0]) if reached.numel() else 0


def stage1_protected(abar: torch.Tensor, threshold: float, cap: int | None) -> list[torch.Tensor]:
    """§4.3 (f): per kv head, the positions protected by stage 1. abar [H, n]; cap None = no cap."""
    out = []
    for row in abar:
        p = row / row.sum()
        count = stage1_count(p, threshold)
        if cap is not None:
            count = min(count, cap)
        order = torch.argsort(p, descending=True, stable=True)
        out.append(order[:count])
    return out


def value_share(values: torch.Tensor, o_weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """§4.3 (e): values [H, T, D] (kv heads), o_weight [d, H_q·D] -> nu [H, T].
    N[h, t] = ||V[g(h), t] · W_o^(h)||_1 with W_o^(h) = o_weight[:, h·D:(h+1)·D]^T, averaged over the
    query heads of each group, then divided by its sum over the kv heads (per token)."""
    n_kv, _, d_head = values.shape
    group = n_heads // n_kv
    norms = []
    for h in range(n_heads):
        w_h = o_weight[:, h * d_head:(h + 1) * d_head]  # [d, D]
        norms.append((values[h // group] @ w_h.T).abs().sum(-1))  # [T]
    per_query_head = torch.stack(norms)  # [H_q, T]
    per_kv_head = per_query_head.view(n_kv, group, -1).mean(1)
    return per_kv_head / per_kv_head.sum(0, keepdim=True)


@torch.no_grad()
def toy_example() -> dict:
    """§4.5: H = 1, G = 2, w = 2, n = 6, k = 5, beta = 0, no cap. Returns P~, M, mu, S, the stage-1
    p and the protected set, computed with the same functions as the real press."""
    a5 = torch.tensor([[[[.30, .05, .05, .10, .05, .05], [.20, .02, .02, .02, .30, .04]],
                        [[.40, .10, .00, .00, .00, .10], [.10, .00, .50, .00, .00, .00]]]], dtype=torch.float64)
    m, mu, s = defensive_aggregate(a5, 5)
    abar = raw_average(a5)
    protected = stage1_protected(abar, TAU - 0.0, cap=None)
    return {"pooled": pool_renormalise(a5, 5)[0], "M": m[0], "mu": float(mu[0]), "S": s[0],
            "p": (abar / abar.sum(-1, keepdim=True))[0], "protected": sorted(protected[0].tolist())}


# ------------------------------------------------------------------------------------------------
# Per-layer scores from the model
# ------------------------------------------------------------------------------------------------

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def window_attention(attn, x: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     window: int) -> torch.Tensor:
    """§1.4 in fp32: x [L, d] attention input, keys [H, L, D] after RoPE, cos/sin [L, D].
    Returns A [H_q, w, n]: softmax over all L keys (window queries see keys up to their own
    position), window columns dropped."""
    L = x.shape[0]
    n_heads = attn.config.num_attention_heads
    d_head = keys.shape[-1]
    q = attn.q_proj(x[L - window:]).view(window, n_heads, d_head)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before RoPE
        q = attn.q_norm(q)
    q = q.transpose(0, 1).float()  # [H_q, w, D]
    c, s_ = cos[L - window:].float(), sin[L - window:].float()
    q = q * c + _rotate_half(q) * s_
    k = keys.float().repeat_interleave(n_heads // keys.shape[0], dim=0)  # [H_q, L, D]
    logits = q @ k.transpose(1, 2) / math.sqrt(d_head)  # [H_q, w, L]
    query_pos = torch.arange(L - window, L)[:, None]
    key_pos = torch.arange(L)[None, :]
    logits = logits.masked_fill(key_pos > query_pos, float("-inf"))
    return torch.softmax(logits, dim=-1)[..., : L - window]


def layer_scores(attn, x, keys, values, cos, sin, ratio: float, window: int, kernel: int,
                 tau: float = TAU) -> tuple[torch.Tensor, dict]:
    """§4.3 (a)-(g) for one layer. Returns (scores [H, L], details)."""
    L = x.shape[0]
    n = L - window
    if n <= 0:
        raise ValueError(f"context of {L} tokens is not longer than the window {window}")
    n_kv = keys.shape[0]
    n_heads = attn.config.num_attention_heads
    group = n_heads // n_kv
    a = window_attention(attn, x, keys, cos, sin, window)  # [H_q, w, n]
    a5 = a.view(n_kv, group, window, n)
    beta = window_bias(a, window)
    abar = raw_average(a5)
    m, mu, s = defensive_aggregate(a5, kernel)
    nu = value_share(values[:, :n].float(), attn.o_proj.weight.float(), n_heads)
    s1 = s * nu
    cap = stage1_cap(n, ratio, window)
    protected = stage1_protected(abar, tau - beta, cap)
    s_max = s1.max()
    scores = torch.empty(n_kv, L, dtype=torch.float32)
    scores[:, :n] = s1
    for g, idx in enumerate(protected):
        scores[g, idx] = s_max
    scores[:, n:] = s_max
    return scores, {"beta": beta, "cap": cap, "stage1": [sorted(p.tolist()) for p in protected],
                    "s_max": float(s_max), "M": m, "mu": mu, "nu": nu}


def _top_positions(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries; ties go to the lower index (stable descending sort)."""
    return torch.argsort(flat, descending=True, stable=True)[:k]


def select_layer(scores: torch.Tensor, ratio: float) -> list[list[int]]:
    """§4.3 (h): scores [H, L] -> kept positions per kv head (ascending); int(L·(1-cr)·H) in all."""
    n_kv, L = scores.shape
    budget = int(L * (1 - ratio) * n_kv)
    top = _top_positions(scores.flatten(), budget)
    return [sorted((top[top // L == g] % L).tolist()) for g in range(n_kv)]


def select_global(all_scores: list[torch.Tensor], ratio: float) -> list[list[list[int]]]:
    """§5: one top int(L·(1-cr)·H·N_L) over every layer's raw scores [H, L]."""
    n_kv, L = all_scores[0].shape
    n_layers = len(all_scores)
    budget = int(L * (1 - ratio) * n_kv * n_layers)
    top = _top_positions(torch.stack(all_scores).flatten(), budget)
    per = n_kv * L
    kept = []
    for layer in range(n_layers):
        mine = top[top // per == layer] % per
        kept.append([sorted((mine[mine // L == g] % L).tolist()) for g in range(n_kv)])
    return kept


# ------------------------------------------------------------------------------------------------
# Model driver
# ------------------------------------------------------------------------------------------------

def context_ids(tokenizer, text: str) -> list[int]:
    """kvpress rendering without a chat template: bos + context, no special tokens added."""
    if tokenizer.chat_template is not None:
        raise NotImplementedError("only models without a chat template are rendered here")
    return tokenizer.encode((tokenizer.bos_token or "") + text, add_special_tokens=False)


@torch.no_grad()
def capture_prefill(model, ids: list[int]) -> list[dict]:
    """One uncompressed prefill. Per layer: x [L, d], keys/values [H, L, D], cos/sin [L, D]."""
    from transformers import DynamicCache

    layers = model.model.layers
    seen: list[dict] = [{} for _ in layers]
    hooks = []

    def grab(i):
        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            seen[i].update(x=x[0].detach().clone(), cos=cos[0].detach().clone(), sin=sin[0].detach().clone())
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.register_forward_pre_hook(grab(i), with_kwargs=True))
    try:
        cache = DynamicCache()
        model.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    for i in range(len(layers)):
        seen[i]["keys"] = cache.layers[i].keys[0].detach().clone()
        seen[i]["values"] = cache.layers[i].values[0].detach().clone()
    return seen


@torch.no_grad()
def reference_kept(model, ids: list[int], ratio: float, layer_wise: bool, window: int = 32, kernel: int = 5,
                   tau: float = TAU) -> tuple[list[list[list[int]]], list[dict]]:
    """Kept positions [layer][kv head] of DefensiveKV (layer_wise False) or Layer-DefensiveKV."""
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    captured = capture_prefill(model, ids)
    L = len(ids)
    if ratio == 0:
        return [[list(range(L))] * c["keys"].shape[0] for c in captured], []
    scored = [layer_scores(layer.self_attn, c["x"], c["keys"], c["values"], c["cos"], c["sin"], ratio, window,
                           kernel, tau)
              for layer, c in zip(model.model.layers, captured)]
    details = [dict(d, scores=s) for s, d in scored]
    if layer_wise:
        return select_global([s for s, _ in scored], ratio), details
    return [select_layer(s, ratio) for s, _ in scored], details


def boundary_scores(details: list[dict], ratio: float, layer_wise: bool) -> list[float]:
    """Per layer, the score of the last entry the selection keeps (the budget-th largest: of the
    layer for DefensiveKV, of the whole model for Layer-DefensiveKV). A kept set may differ from
    another one only among entries whose score equals this value (exact ties)."""
    scores = [d["scores"] for d in details]
    n_kv, L = scores[0].shape
    if layer_wise:
        budget = int(L * (1 - ratio) * n_kv * len(scores))
        value = float(torch.sort(torch.stack(scores).flatten(), descending=True).values[budget - 1])
        return [value] * len(scores)
    budget = int(L * (1 - ratio) * n_kv)
    return [float(torch.sort(s.flatten(), descending=True).values[budget - 1]) for s in scores]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=pathlib.Path)
    ap.add_argument("--context-file", required=True, type=pathlib.Path)
    ap.add_argument("--ratio", required=True, type=float)
    ap.add_argument("--layer", action="store_true", help="Layer-DefensiveKV (global budget) instead of DefensiveKV")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--kernel", type=int, default=5)
    ap.add_argument("--tau", type=float, default=TAU)
    ap.add_argument("--out", required=True, type=pathlib.Path)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = context_ids(tok, args.context_file.read_text())
    kept, details = reference_kept(model, ids, args.ratio, args.layer, args.window, args.kernel, args.tau)
    result = {"press": "layer_defensivekv" if args.layer else "defensivekv", "compression_ratio": args.ratio,
              "context_tokens": len(ids), "kept": [[len(h) for h in layer] for layer in kept], "positions": kept,
              "stage1_cap": [d["cap"] for d in details], "window_bias": [d["beta"] for d in details]}
    args.out.write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
