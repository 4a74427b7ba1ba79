#!/usr/bin/env python3
"""A quick greedy check of an exported model with transformers: RULER-style samples of defkv-eval's
seed (42) from ruler-dump, rendered as defkv-server renders a plain prompt, scored with RULER's
string_match_all (the share of reference strings found in the answer, case-insensitive).

Haystacks are sized by characters per token (measured in the model's tokenizer), as
`defkv-eval --chars-per-token` does, so samples are close to, not exactly, what defkv-eval builds.

Usage: check.py --model DIR --dump build-train/ruler-dump [--tasks a,b] [--length 4096] [--samples 20]
"""
import argparse
import json
import pathlib
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import data  # noqa: E402


def string_match_all(pred: str, refs: list[str]) -> float:
    pred = pred.strip().lower()
    return sum(r.lower() in pred for r in refs) / len(refs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=pathlib.Path)
    ap.add_argument("--dump", required=True)
    ap.add_argument("--tasks", default="niah_single_1,niah_single_2")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-new-tokens", type=int, default=0, help="default: 3 x the answer's tokens + 8")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    tok = Tokenizer.from_file(str(a.model / "tokenizer.json"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(a.model), dtype=dtype).to(device).eval()
    tasks = a.tasks.split(",")
    cpt = data.calibrate(a.dump, tok, tasks, seed=a.seed + 1)
    scores = {}
    for task in tasks:
        out = subprocess.run([a.dump, "--seed", str(a.seed), "--count", str(a.samples), "--length", str(a.length),
                              "--tasks", task, "--cpt", f"{task}={cpt[task]:.4f}"],
                             check=True, capture_output=True, text=True).stdout
        t0, total, lens, shown = time.time(), 0.0, [], 0
        for line in out.splitlines():
            s = json.loads(line)
            ids = data.prompt_ids(tok, s)
            lens.append(len(ids))
            want = len(tok.encode(data.answer_text(s), add_special_tokens=False).ids)
            new = a.max_new_tokens or 3 * want + 8
            with torch.no_grad():
                gen = model.generate(torch.tensor([ids], device=device), max_new_tokens=new, do_sample=False,
                                     eos_token_id=data.EOS, pad_token_id=data.PAD)
            text = tok.decode([t for t in gen[0, len(ids):].tolist() if t != data.EOS])
            score = string_match_all(text, s["answers"])
            total += score
            if score < 1 and shown < 2:
                print(f"  miss {task}#{s['index']}: want {s['answers']} got {text!r}", flush=True)
                shown += 1
        n = max(len(lens), 1)
        scores[task] = 100 * total / n
        print(f"check {task} @ {a.length}: {scores[task]:.1f}% over {len(lens)} samples "
              f"(prompt {min(lens)}-{max(lens)} tokens, {time.time() - t0:.1f}s)", flush=True)
    print("check: " + json.dumps({k: round(v, 1) for k, v in scores.items()}), flush=True)


if __name__ == "__main__":
    main()
