#!/usr/bin/env python3
"""The peer of defkv-bench: HF transformers (full cache, sdpa attention) on the same random-weight
model shapes and contexts, on the same GPU. Prints the same columns (press 'hf-full').

Usage: bench_hf.py [--shapes llama3.1-8b,qwen2.5-7b] [--contexts 4096,32768] [--decode-steps 32] [--json]
"""
import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHAPES = {
    "llama3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                        max_position_embeddings=131072, rms_norm_eps=1e-5,
                        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=131072, rms_norm_eps=1e-6,
                       rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
}


def sync():
    torch.cuda.synchronize()


def run(model, ctx, steps):
    ids = torch.randint(0, model.config.vocab_size, (1, ctx), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        ttft = time.perf_counter() - t0
        cache = out.past_key_values
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)  # warm-up step
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t1 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        decode_ms = 1e3 * (time.perf_counter() - t1) / steps
    return dict(ttft_s=ttft, decode_ms_per_token=decode_ms, peak_bytes=torch.cuda.max_memory_allocated())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama3.1-8b")
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    for shape in a.shapes.split(","):
        spec = dict(SHAPES[shape])
        cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
        for ctx in (int(c) for c in a.contexts.split(",")):
            run(model, min(ctx, 1024), 2)  # warm-up
            r = run(model, ctx, a.decode_steps)
            r.update(shape=shape, context=ctx, press="hf-full")
            if a.json:
                print(json.dumps(r), flush=True)
            else:
                print(f"{shape:<12} {ctx:7d} {'hf-full (sdpa)':<18} {'':5} {'':10} {'':10} {'':6} "
                      f"{r['ttft_s']:9.3f} {r['decode_ms_per_token']:10.3f} {'':9} {r['peak_bytes'] / 1e9:9.2f}",
                      flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
