"""Helpers for the press parity tests: deterministic contexts, running defkv-generate (alone or many
at once), building the kvpress press that matches a defkv press name, and observing which context
positions kvpress actually kept in each (layer, kv head).

How kvpress's decision is observed (never re-derived from its scores): the press's compress() is
wrapped, per press instance, so the wrapper sees kvpress's own inputs and outputs.
  * uniform presses (ScorerPress subclasses, CriticalKVPress, PyramidKVPress) return gathered K/V;
    every compressed row is located, by exact equality of the (key, value) row, among the
    uncompressed rows of the same layer and head;
  * mask-based presses (AdaKVPress, CriticalAdaKVPress) keep K/V whole and store the evicted
    entries in module.masked_key_indices; the kept set is the complement.
How the reference answer is decoded: with kvpress's pipeline (greedy, same rendering), where the
uniform presses really shrink the cache. For the mask-based presses and PyramidKV the evicted
entries are removed from attention exactly (see _exact_mask_attention) instead of by kvpress's
approximate "fake key" patch; this is the semantics of real eviction, which defkv implements.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import pathlib
import random
import re
import subprocess
import time

# Every press defkv-generate accepts.
ALL_PRESSES = ["none", "snapkv", "pyramidkv", "streaming_llm", "knorm", "random", "tova", "observed_attention",
               "expected_attention", "keydiff", "adakv", "criticalkv", "critical_adakv", "defensivekv",
               "layer_defensivekv"]
# The presses kvpress also has, compared entry by entry.
KVPRESS_PRESSES = ["snapkv", "pyramidkv", "streaming_llm", "knorm", "tova", "observed_attention",
                   "expected_attention", "keydiff", "adakv", "criticalkv", "critical_adakv"]
WINDOWED = {"snapkv", "pyramidkv", "adakv", "criticalkv", "critical_adakv", "defensivekv", "layer_defensivekv"}
MASK_BASED = {"adakv", "critical_adakv"}  # kvpress keeps the cache whole and masks the evicted keys
# kvpress presses that keep each head's top entries of their own score(): their scores tell exact
# ties at the boundary apart (where either choice is right; torch.topk's choice among equal
# scores differs from defkv's, earlier position first).
PER_HEAD_TOPK = {"snapkv", "streaming_llm", "knorm", "tova", "observed_attention", "expected_attention", "keydiff"}

WINDOW = 16  # every windowed press runs with this window on both sides (defkv's default is 32, kvpress's 64)
QUESTION = "What did the keeper say?"

_WORDS = ("the keeper of the old lighthouse wrote seven letters to a sailor named Ada about storms "
          "ropes lamps gulls tides and the number 4821 which she said was the secret code of the harbour "
          "while rain fell on glass and copper bells rang twice before dawn").split()


def context_text(n_tokens: int, seed: int = 0) -> str:
    """Deterministic English-like text that the byte-level tiny tokenizer turns into exactly
    n_tokens - 1 tokens (one per byte), so that with the bos token the context has n_tokens."""
    rng = random.Random(1000 + seed)
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < n_tokens + 8:
        words.append(rng.choice(_WORDS))
    return " ".join(words)[: n_tokens - 1]


# ------------------------------------------------------------------------------------------------
# defkv-generate
# ------------------------------------------------------------------------------------------------

def press_options(press: str) -> dict[str, str]:
    """The options passed to defkv for a press: the kvpress defaults, spelled out, except the window."""
    opts: dict[str, str] = {}
    if press in WINDOWED:
        opts.update(window_size=str(WINDOW), kernel_size="5")
    if press == "pyramidkv":
        opts["beta"] = "20"
    if press in ("streaming_llm", "expected_attention"):
        opts["n_sink"] = "4"
    if press in ("adakv", "critical_adakv"):
        opts["alpha_safeguard"] = "0.2"
    if press in ("criticalkv", "critical_adakv"):
        opts.update(epsilon="0.0001", first_stage_ratio="0.5")
    if press == "random":
        opts["seed"] = "7"
    return opts


@dataclasses.dataclass
class CppRun:
    """One defkv-generate run: exit code, streams and the parsed --kept-json (None if absent)."""
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    kept: dict | None

    def describe(self) -> str:
        return f"defkv-generate {' '.join(self.args)} -> rc={self.returncode}\n{self.stderr.strip()[-2000:]}"


def generate_args(model: pathlib.Path, context_file: pathlib.Path, press: str, ratio: float,
                  options: dict[str, str] | None = None, question: str = QUESTION, max_new_tokens: int = 12,
                  kept_json: pathlib.Path | None = None, report: bool = True) -> list[str]:
    args = ["--model", str(model), "--context-file", str(context_file), "--question", question,
            "--max-new-tokens", str(max_new_tokens), "--quiet", "--threads", "1"]
    if press is not None:
        args += ["--press", press, "--compression-ratio", repr(ratio) if isinstance(ratio, float) else str(ratio)]
    for k, v in (options or {}).items():
        args += ["--press-option", f"{k}={v}"]
    if kept_json is not None:
        args += ["--kept-json", str(kept_json)]
    if report:
        args.append("--report")
    return args


def run_cpp(bin_dir: pathlib.Path, args: list[str], timeout: float = 120) -> CppRun:
    for attempt in range(4):
        proc = subprocess.run([str(bin_dir / "defkv-generate"), *args], capture_output=True, text=True,
                              timeout=timeout)
        # A library half-written by a concurrent rebuild fails to load (exit 127): wait, retry.
        if proc.returncode != 127 or "error while loading shared libraries" not in proc.stderr:
            break
        time.sleep(10)
    kept = None
    if "--kept-json" in args and proc.returncode == 0:
        path = pathlib.Path(args[args.index("--kept-json") + 1])
        if path.exists():
            kept = json.loads(path.read_text())
    return CppRun(args, proc.returncode, proc.stdout, proc.stderr, kept)


def run_cpp_many(bin_dir: pathlib.Path, arg_lists: list[list[str]], workers: int = 2) -> list[CppRun]:
    """Runs independent defkv-generate commands side by side (one CPU thread each), in order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda a: run_cpp(bin_dir, a), arg_lists))


REPORT_RE = re.compile(r"entries (\d+) -> (\d+), bytes (\d+) -> (\d+)")


def parse_report(stderr: str) -> tuple[int, int, int, int] | None:
    """(entries before, entries after, bytes before, bytes after) from --report, or None."""
    m = REPORT_RE.search(stderr)
    return tuple(int(x) for x in m.groups()) if m else None


# ------------------------------------------------------------------------------------------------
# Expected kept counts (the rounding rules of §1.2 and the installed kvpress)
# ------------------------------------------------------------------------------------------------

def uniform_n_kept(L: int, ratio: float) -> int:
    """Installed kvpress compute_n_kept: max(1, int(L * (1 - cr))) for cr < 1."""
    return max(1, int(L * (1 - ratio)))


def pyramid_n_kept(L: int, ratio: float, window: int, beta: float, n_layers: int, layer: int) -> int:
    """Per-head budget of PyramidKV in layer `layer` (installed kvpress rule, Python round)."""
    capacity = window + L * (1 - ratio)
    low = (capacity - window) / beta
    high = (capacity - window) * 2 - low
    if high >= L - window:
        high = L - window
        low = (capacity - window) * 2 - high
    if not (L >= high >= low >= window):
        return max(1, round(L * (1 - ratio)))
    step = (high - low) / (n_layers - 1) if n_layers > 1 else 0.0
    return round(high - layer * step)


def expected_counts(press: str, L: int, ratio: float, H: int, n_layers: int) -> dict:
    """What the rounding rule fixes for a press: {"per_head": [[...]]} (exact per layer and head),
    {"per_layer": [...]} (sum over heads) or {"total": n} (sum over the model)."""
    if press == "none" or ratio == 0:
        return {"per_head": [[L] * H for _ in range(n_layers)]}
    if press == "pyramidkv":
        return {"per_head": [[pyramid_n_kept(L, ratio, WINDOW, 20, n_layers, l)] * H for l in range(n_layers)]}
    if press in MASK_BASED:
        return {"per_layer": [H * uniform_n_kept(L, ratio)] * n_layers}
    if press == "defensivekv":
        return {"per_layer": [int(L * (1 - ratio) * H)] * n_layers}
    if press == "layer_defensivekv":
        return {"total": int(L * (1 - ratio) * H * n_layers)}
    return {"per_head": [[uniform_n_kept(L, ratio)] * H for _ in range(n_layers)]}


def check_counts(kept: list[list[int]], expected: dict) -> str | None:
    """None if the kept counts follow the rule, else a description of the difference."""
    if "per_head" in expected and kept != expected["per_head"]:
        return f"kept per head {kept} != {expected['per_head']}"
    if "per_layer" in expected and [sum(k) for k in kept] != expected["per_layer"]:
        return f"kept per layer {[sum(k) for k in kept]} != {expected['per_layer']}"
    if "total" in expected and sum(map(sum, kept)) != expected["total"]:
        return f"kept in total {sum(map(sum, kept))} != {expected['total']}"
    return None


def model_shape(model_dir: pathlib.Path) -> tuple[int, int, int]:
    """(layers, kv heads, head_dim) from config.json."""
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"], cfg.get("num_key_value_heads", cfg["num_attention_heads"]), head_dim


# ------------------------------------------------------------------------------------------------
# kvpress
# ------------------------------------------------------------------------------------------------

EXACT_MASK_ATTN = "defkv_exact_mask"


def attn_implementation(press: str) -> str:
    """ObservedAttention reads the eager attention weights. Every other press runs on SDPA through
    EXACT_MASK_ATTN, which also removes the entries kvpress decided to evict but left in the cache."""
    return "eager" if press == "observed_attention" else EXACT_MASK_ATTN


def _exact_mask_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA in which the keys listed in module.defkv_evicted ((kv head, position) index tensors) take
    no part, exactly as if they had been removed from the cache.

    kvpress's own head-wise masking (attention_patch) replaces evicted keys by a "fake key" found by
    an iterative hyperplane search. On these tiny random models the search often fails for a
    multi-token question ("Could not find fake keys"), and when it succeeds the masked weight is only
    small, not zero. Real eviction is what defkv does, so the reference decodes with an exact mask
    while the eviction decision stays kvpress's own."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    evicted = getattr(module, "defkv_evicted", None)
    q_len, k_len = query.shape[2], key.shape[2]
    if evicted is None and (q_len == 1 or attention_mask is not None or q_len == k_len):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    n_heads, n_kv = query.shape[1], key.shape[1]
    if attention_mask is None:  # bottom-right aligned causal pattern
        i = torch.arange(q_len)[:, None]
        j = torch.arange(k_len)[None, :]
        allowed = (j <= i + (k_len - q_len))[None, None]
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    allowed = allowed.expand(query.shape[0], n_heads, q_len, k_len).clone()
    if evicted is not None:
        keep = torch.ones(n_kv, k_len, dtype=torch.bool)
        keep[evicted[0], evicted[1]] = False
        allowed &= keep.repeat_interleave(n_heads // n_kv, dim=0)[None, :, None, :]
    return sdpa_attention_forward(module, query, key, value, allowed, **kwargs)


def _register_exact_mask_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(EXACT_MASK_ATTN, _exact_mask_attention)
    AttentionMaskInterface.register(EXACT_MASK_ATTN, sdpa_mask)


def make_kvpress(press: str, ratio: float):
    """The kvpress object equal to defkv's press `press` with press_options(press)."""
    import kvpress as kp

    def snap():
        return kp.SnapKVPress(compression_ratio=ratio, window_size=WINDOW, kernel_size=5)

    if press == "snapkv":
        return snap()
    if press == "pyramidkv":
        return kp.PyramidKVPress(compression_ratio=ratio, window_size=WINDOW, kernel_size=5, beta=20)
    if press == "streaming_llm":
        return kp.StreamingLLMPress(compression_ratio=ratio, n_sink=4)
    if press == "knorm":
        return kp.KnormPress(compression_ratio=ratio)
    if press == "tova":
        return kp.TOVAPress(compression_ratio=ratio)
    if press == "observed_attention":
        return kp.ObservedAttentionPress(compression_ratio=ratio)
    if press == "expected_attention":
        return kp.ExpectedAttentionPress(compression_ratio=ratio, n_sink=4)
    if press == "keydiff":
        return kp.KeyDiffPress(compression_ratio=ratio)
    if press == "adakv":
        return kp.AdaKVPress(snap(), alpha_safeguard=0.2)
    if press == "criticalkv":
        return kp.CriticalKVPress(snap(), epsilon=1e-4, first_stage_ratio=0.5)
    if press == "critical_adakv":
        return kp.CriticalAdaKVPress(snap(), alpha_safeguard=0.2, epsilon=1e-4, first_stage_ratio=0.5)
    raise ValueError(f"no kvpress counterpart for {press}")


_MODELS: dict = {}


def load_kvpress_pipeline(model_dir: pathlib.Path, attn: str):
    """(model, tokenizer, kv-press-text-generation pipeline), fp32 on CPU, cached per (dir, attn)."""
    key = (str(model_dir), attn)
    if key not in _MODELS:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

        from transformers.utils import logging as hf_logging

        import kvpress  # noqa: F401  (registers the pipeline)
        hf_logging.disable_progress_bar()
        _register_exact_mask_attention()
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                     attn_implementation=attn).eval()
        pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
        _MODELS[key] = (model, tok, pipe)
    return _MODELS[key]


def _rows_to_positions(full_k, full_v, kept_k, kept_v) -> list[list[int]]:
    """For each kv head, the positions (ascending) in the uncompressed (key, value) rows of the
    compressed rows, by exact equality. Shapes: full [1, H, L, D], kept [1, H, n, D]."""
    import torch
    full = torch.cat([full_k[0], full_v[0]], dim=-1)  # [H, L, 2D]
    kept = torch.cat([kept_k[0], kept_v[0]], dim=-1)  # [H, n, 2D]
    out = []
    for h in range(full.shape[0]):
        same = (kept[h][:, None, :] == full[h][None, :, :]).all(-1)  # [n, L]
        hits = same.sum(-1)
        if not bool((hits == 1).all()):
            raise AssertionError(f"head {h}: a compressed row matches {hits.tolist()} uncompressed rows")
        pos = same.float().argmax(-1).tolist()
        if len(set(pos)) != len(pos):
            raise AssertionError(f"head {h}: a position was kept twice")
        out.append(sorted(pos))
    return out


def kvpress_run(model_dir: pathlib.Path, press_name: str, ratio: float, context: str, question: str = QUESTION,
                max_new_tokens: int = 12, scores: dict | None = None) -> tuple[list[list[list[int]]] | None, str]:
    """Runs kvpress's pipeline and returns (kept positions [layer][kv head], answer). With ratio 0
    or press "none" the positions are None (nothing is compressed). With `scores` (a dict) and a
    press of PER_HEAD_TOPK, scores[layer] receives the press's scores [kv heads, L] (fp32, CPU)."""
    import torch

    attn = attn_implementation(press_name)
    model, _, pipe = load_kvpress_pipeline(model_dir, attn)
    if press_name == "none":
        for layer in model.model.layers:
            layer.self_attn.defkv_evicted = None
        with torch.no_grad():
            return None, pipe(context, question=question, press=None, max_new_tokens=max_new_tokens)["answer"]
    press = make_kvpress(press_name, ratio)
    n_layers = model.config.num_hidden_layers
    kept: list = [None] * n_layers
    inner = press.compress

    def observing_compress(module, hidden_states, keys, values, attentions, kwargs):
        new_k, new_v = inner(module, hidden_states, keys, values, attentions, kwargs)
        if ratio == 0:
            return new_k, new_v
        L = keys.shape[2]
        if press_name in MASK_BASED:
            masked = module.masked_key_indices
            assert masked is not None and bool((masked[0] == 0).all())
            evicted = torch.zeros(keys.shape[1], L, dtype=torch.bool)
            evicted[masked[1], masked[2]] = True
            kept[module.layer_idx] = [torch.nonzero(~row).flatten().tolist() for row in evicted]
            module.masked_key_indices = None  # decoding masks exactly (see _exact_mask_attention)
        else:
            kept[module.layer_idx] = _rows_to_positions(keys, values, new_k, new_v)
        if press_name in MASK_BASED or press_name == "pyramidkv":
            # Mask-based presses leave the cache whole. PyramidKV shrinks layers to different lengths,
            # which breaks the attention mask transformers shares across layers for the question
            # prefill; so its cache is kept whole too, and its decision is applied as a mask.
            ev = [(h, t) for h, pos in enumerate(kept[module.layer_idx]) for t in sorted(set(range(L)) - set(pos))]
            module.defkv_evicted = (torch.tensor([h for h, _ in ev], dtype=torch.long),
                                    torch.tensor([t for _, t in ev], dtype=torch.long))
            return keys, values
        return new_k, new_v

    for layer in model.model.layers:
        layer.self_attn.defkv_evicted = None
    press.compress = observing_compress  # instance attribute: BasePress.forward_hook calls self.compress
    if scores is not None and press_name in PER_HEAD_TOPK:
        inner_score = press.score

        def recording_score(module, hidden_states, keys, values, attentions, kwargs):
            s = inner_score(module, hidden_states, keys, values, attentions, kwargs)
            scores[module.layer_idx] = s[0].detach().float().cpu()
            return s

        press.score = recording_score  # ScorerPress.compress calls self.score
    with torch.no_grad():
        answer = pipe(context, question=question, press=press, max_new_tokens=max_new_tokens)["answer"]
    if ratio == 0:
        return None, answer
    assert all(k is not None for k in kept), "kvpress did not compress every layer"
    return kept, answer


# ------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------

def per_head_ties(ref: list[list[list[int]]], got: list[list[list[int]]], scores: dict) -> int:
    """How many of the entries kept_difference counts sit exactly at their head's boundary score
    (the lowest score the reference kept in that head), by the reference's scores: there either
    choice is right."""
    n = 0
    for layer, (rl, gl) in enumerate(zip(ref, got)):
        s = scores[layer]
        for h, (rh, gh) in enumerate(zip(rl, gl)):
            only_ref, only_got = set(rh) - set(gh), set(gh) - set(rh)
            if not (only_ref or only_got) or not rh:
                continue
            boundary = min(float(s[h, t]) for t in rh)
            tie_ref = sum(float(s[h, t]) == boundary for t in only_ref)
            tie_got = sum(float(s[h, t]) == boundary for t in only_got)
            n += max(len(only_ref), len(only_got)) - max(len(only_ref) - tie_ref, len(only_got) - tie_got)
    return n


def kept_difference(ref: list[list[list[int]]], got: list[list[list[int]]]) -> tuple[int, int, list[str]]:
    """(mismatches, entries, details). An entry is a kept (layer, head, position) of `ref`;
    mismatches counts the entries of either side missing from the other, halved (rounded up) when
    both sides keep the same number (a swap of one tie counts once)."""
    mism, total, details = 0, 0, []
    for l, (rl, gl) in enumerate(zip(ref, got)):
        for h, (rh, gh) in enumerate(zip(rl, gl)):
            a, b = set(rh), set(gh)
            only_ref, only_got = sorted(a - b), sorted(b - a)
            total += len(a)
            if only_ref or only_got:
                mism += max(len(only_ref), len(only_got))
                details.append(f"layer {l} head {h}: only reference {only_ref[:10]}, only defkv {only_got[:10]}")
    if len(ref) != len(got) or any(len(x) != len(y) for x, y in zip(ref, got)):
        details.append(f"shape differs: reference {[len(x) for x in ref]}, defkv {[len(x) for x in got]}")
        mism = max(mism, 1)
    return mism, total, details

