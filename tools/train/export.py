#!/usr/bin/env python3
"""Writes a trained model as an HF directory defkv serves: config.json, model.safetensors (bf16,
tied embeddings so no lm_head), tokenizer.json, tokenizer_config.json, generation_config.json.

The files are written by hand, not by save_pretrained, so their content does not depend on the
installed transformers version (the GPU machine's differs from the project's). Every file must
stay under 16 MiB (what comes back from the GPU machine, and what git takes without LFS).

Usage: export.py --checkpoint OUT/ckpt.pt --tokenizer DIR --out MODEL_DIR
"""
import argparse
import json
import pathlib
import shutil

import torch
from safetensors.torch import save_file

MAX_FILE = 16 * 1024 * 1024


def hf_config(cfg: dict) -> dict:
    """The Llama config.json of a model built by train.py from `cfg` (its model options)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden"],
        "intermediate_size": cfg["intermediate"],
        "num_hidden_layers": cfg["layers"],
        "num_attention_heads": cfg["heads"],
        "num_key_value_heads": cfg["kv_heads"],
        "head_dim": cfg["hidden"] // cfg["heads"],
        "hidden_act": "silu",
        "max_position_embeddings": cfg["max_position"],
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg["rope_theta"])},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "use_cache": True,
        "dtype": "bfloat16",
    }


def export(state: dict, cfg: dict, tokenizer_dir: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
    """`state` is the model's state_dict (HF LlamaForCausalLM names)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in state.items()
               if k != "lm_head.weight" and not k.endswith("rotary_emb.inv_freq")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    files = sorted(out.iterdir())
    for f in files:
        if f.stat().st_size >= MAX_FILE:
            raise SystemExit(f"export: {f} is {f.stat().st_size} bytes, over the 16 MiB limit")
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=pathlib.Path)
    ap.add_argument("--tokenizer", required=True, type=pathlib.Path)
    ap.add_argument("--out", required=True, type=pathlib.Path)
    a = ap.parse_args()
    ck = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
    for f in export(ck["model"], ck["model_cfg"], a.tokenizer, a.out):
        print(f"{f}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
