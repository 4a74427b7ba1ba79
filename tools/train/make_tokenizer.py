#!/usr/bin/env python3
"""Trains the project's own tokenizer: a byte-level BPE learnt from RULER-style samples.

The structure is one defkv's C++ tokenizer reads (the Qwen2 kind): a Split pre-tokenizer on a
regex that isolates every digit (a 7-digit needle is always 7 tokens, spelled the same in the
haystack, the question and the answer), then ByteLevel without its own regex, a ByteLevel decoder,
no normalizer. Specials: <pad>=0, <s>=1, </s>=2. tokenizer_config.json asks for a BOS
(add_bos_token) and has no chat template, so defkv renders prompts plainly.

Usage: make_tokenizer.py --dump build-train/ruler-dump --out DIR [--vocab 4096]
Deterministic: the same dump binary and arguments give the same tokenizer.json.
"""
import argparse
import json
import pathlib
import subprocess

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<pad>", "<s>", "</s>"]
# Contractions, letters (with one leading non-letter), single digits, punctuation runs, newlines,
# spaces: the split of Qwen2's tokenizer, written from its documented pre-tokenizer.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus(dump: str, seed: int) -> list[str]:
    """Texts from every task (and plain text) at short and long lengths."""
    texts = []
    for length, count in ((512, 600), (2048, 200), (8192, 40)):
        out = subprocess.run([dump, "--seed", str(seed), "--count", str(count), "--length", str(length),
                              "--tasks", "all,text"],
                             check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            s = json.loads(line)
            texts += [s["context"], s["question"] + "\n" + s["answer_prefix"], " ".join(s["answers"])]
    return texts


def build(texts: list[str], vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def write(tok: Tokenizer, out: pathlib.Path, max_length: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False,
        "model_max_length": max_length}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump", required=True, help="the ruler-dump binary")
    ap.add_argument("--out", required=True, type=pathlib.Path)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=7000, help="dump seed (not defkv-eval's 42)")
    ap.add_argument("--max-length", type=int, default=16384, help="model_max_length to record")
    a = ap.parse_args()
    tok = build(corpus(a.dump, a.seed), a.vocab)
    write(tok, a.out, a.max_length)
    print(f"tokenizer: {tok.get_vocab_size()} tokens -> {a.out}")


if __name__ == "__main__":
    main()
