#!/usr/bin/env python3
"""Writes tiny random-weight HF models of every family defkv serves, with golden outputs.

Each model directory holds what transformers' save_pretrained writes (config.json,
generation_config.json, model.safetensors), a byte-level tokenizer (tokenizer.json,
tokenizer_config.json) and golden.safetensors with:
  prefill_ids    [T]         int64   random prompt ids (T >= 64)
  prefill_logits [T, vocab]  float32 transformers' logits for every prompt position
  decode_ids     [16]        int64   greedy continuation (each fed back as the next input)
  decode_logits  [16, vocab] float32 logits of each decode step (row i predicts decode_ids[i])

Usage: make_tiny_models.py --out DIR [--only NAME ...]. Deterministic (seeded); a directory
that already holds the golden file of this script's version is left alone.
"""
import argparse
import hashlib
import json
import pathlib
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 320
PREFILL = 70
DECODE = 16

# name -> (model_type, config overrides). Two layers each, hidden 64-128, GQA 2:1 and 4:1.
FAMILIES = {
    "llama_gqa2": ("llama", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, tie_word_embeddings=False)),
    "llama3_scaled_tied": ("llama", dict(hidden_size=128, intermediate_size=192, num_attention_heads=8,
                                         num_key_value_heads=2, tie_word_embeddings=True,
                                         rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                              low_freq_factor=1.0, high_freq_factor=4.0,
                                                              original_max_position_embeddings=32))),
    "llama_linear_bias": ("llama", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                        num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                                        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "qwen2": ("qwen2", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                            tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(hidden_size=96, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
                            head_dim=32, tie_word_embeddings=False)),
    "mistral": ("mistral", dict(hidden_size=128, intermediate_size=160, num_attention_heads=8,
                                num_key_value_heads=2, tie_word_embeddings=False)),
}
# Written in transformers 4 spelling (rope_theta + rope_scaling, torch_dtype) to prove both load alike.
V4_SPELLING = {"llama3_scaled_tied"}


def script_version() -> str:
    return hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()[:16]


def byte_tokenizer(out: pathlib.Path) -> None:
    """A byte-level BPE with no merges: every byte is a token, after three specials."""
    specials = ["<pad>", "<s>", "</s>"]
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: ord(c))
    vocab = {tok: i for i, tok in enumerate(specials)}
    for c in byte_chars:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "add_bos_token": True, "model_max_length": 512}, indent=2))


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights large enough that logits are far from uniform and greedy picks are stable."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def to_v4_spelling(cfg_path: pathlib.Path) -> None:
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg_path.write_text(json.dumps(cfg, indent=2))


def make(name: str, out: pathlib.Path) -> None:
    model_type, overrides = FAMILIES[name]
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    gen = torch.Generator().manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=512,
                               rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    randomize(model, gen)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if name in V4_SPELLING:
        to_v4_spelling(out / "config.json")
    byte_tokenizer(out)

    ids = torch.randint(3, VOCAB, (PREFILL,), generator=gen)
    with torch.no_grad():
        outp = model(input_ids=ids[None], use_cache=True)
        prefill_logits = outp.logits[0].float()
        cache = outp.past_key_values
        nxt = prefill_logits[-1].argmax()
        decode_ids, decode_logits = [], []
        for step in range(DECODE):
            decode_ids.append(nxt)
            o = model(input_ids=nxt.view(1, 1), past_key_values=cache, use_cache=True,
                      position_ids=torch.tensor([[PREFILL + step]]))
            cache = o.past_key_values
            decode_logits.append(o.logits[0, -1].float())
            nxt = decode_logits[-1].argmax()
    save_file({
        "prefill_ids": ids.to(torch.int64).contiguous(),
        "prefill_logits": prefill_logits.contiguous(),
        "decode_ids": torch.stack(decode_ids).to(torch.int64).contiguous(),
        "decode_logits": torch.stack(decode_logits).contiguous(),
    }, str(out / "golden.safetensors"), metadata={"version": script_version()})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=pathlib.Path)
    ap.add_argument("--only", nargs="*", choices=sorted(FAMILIES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.only or sorted(FAMILIES):
        d = args.out / name
        stamp = d / ".version"
        if stamp.exists() and stamp.read_text() == script_version() and (d / "golden.safetensors").exists():
            continue
        make(name, d)
        stamp.write_text(script_version())
        print(f"wrote {d}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
