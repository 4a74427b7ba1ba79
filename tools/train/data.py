"""Training batches from ruler-dump, rendered exactly as defkv-server renders a plain prompt.

The server (core/engine/prompt.cpp, plain branch) encodes two parts separately and concatenates
them: Encode(bos_text + context) and Encode(question + "\\n" + answer_prefix). A training sequence
is those two parts, then the encoded answer text and EOS.

A batch holds rows of one length L (a "bucket": 512, 1024, ... tokens); each row is one sample,
right-padded with <pad>. Causal attention keeps real tokens from seeing the padding, so no
attention mask is needed; the padding is only left out of the loss.

  ids  [B, L] int32  token ids, 0 = <pad>
  kind [B, L] uint8  what ids[:, t + 1] is, as a target of position t: 0 none (padding, or past
                     the row), 1 text (language-model loss), 2 answer (answer and EOS tokens)

Worker processes build batches in the background: each keeps one ruler-dump process per bucket
open and reads samples as it needs them (the pipe holds the dump back), tokenizes them and puts
finished batches on a queue.
"""
import json
import os
import queue as queue_lib
import random
import re
import subprocess

import numpy as np

PAD, BOS, EOS = 0, 1, 2
TEXT, ANSWER = 1, 2


def niah_keys(question: str) -> list[str]:
    """The queried keys of a niah question ("... for KEY mentioned ..." or "for A, B, C, and D ...")."""
    m = re.search(r" for (.*) mentioned in the provided text\?", question)
    if not m:
        return []
    head, _, last = m.group(1).rpartition(", and ")
    return head.split(", ") + [last] if head else [last]


def answer_text(sample: dict) -> str:
    """What the model learns to write after the answer prefix: every reference string, so
    string_match_all finds them all. A niah answer restates each key as its needle spells it,
    " KEY is: VALUE.", so the value follows the very tokens that precede it in the needle and a
    plain copy (induction) finds it; several values of one key come in context order. vt, cwe and
    fwe answer in the form of the prompt's own example where it has one."""
    task, answers = sample["task"], sample["answers"]
    if not answers:  # plain text
        return ""
    if task == "vt":  # the prefix ends in "they are: "; the in-context example lists names by spaces
        return " ".join(answers)
    if task == "cwe":  # as the in-context example: " 1. word 2. word ..."
        return "".join(f" {i + 1}. {w}" for i, w in enumerate(answers))
    if task == "fwe":
        return " " + " ".join(answers)
    keys = niah_keys(sample["question"])
    if len(keys) == len(answers):
        pairs = list(zip(keys, answers))
    elif len(keys) == 1:  # several values of one key
        pairs = [(keys[0], v) for v in sorted(answers, key=sample["context"].find)]
    else:
        return " " + ", ".join(answers) + "."
    return "".join(f" {k} is: {v}." for k, v in pairs)


def render(tok, sample: dict, bos_text: str = "<s>") -> tuple[list[int], list[int]]:
    """Token ids of one training sequence and the kind of each id (as a target)."""
    ctx = tok.encode(bos_text + sample["context"], add_special_tokens=False).ids
    if sample["task"] == "text":
        ids = ctx + [EOS]
        return ids, [TEXT] * len(ids)
    q = tok.encode(sample["question"] + "\n" + sample["answer_prefix"], add_special_tokens=False).ids
    ans = tok.encode(answer_text(sample), add_special_tokens=False).ids + [EOS]
    ids = ctx + q + ans
    return ids, [TEXT] * (len(ctx) + len(q)) + [ANSWER] * len(ans)


def prompt_ids(tok, sample: dict, bos_text: str = "<s>") -> list[int]:
    """The prompt as the server feeds it (context part, then question part)."""
    return (tok.encode(bos_text + sample["context"], add_special_tokens=False).ids
            + tok.encode(sample["question"] + "\n" + sample["answer_prefix"], add_special_tokens=False).ids)


def pack(rows: list[tuple[list[int], list[int]]], length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(rows), length), np.int32)
    kind = np.zeros((len(rows), length), np.uint8)
    for b, (r_ids, r_kind) in enumerate(rows):
        n = min(len(r_ids), length)
        ids[b, :n] = r_ids[:n]
        # kind[t] describes ids[t + 1]; the first token (BOS) is never a target.
        kind[b, :n - 1] = r_kind[1:n]
    return ids, kind


def dump_command(dump: str, seed: int, length: int, cpt: dict[str, float], tasks: list[str],
                 low: float) -> list[str]:
    lo = max(64, int(length * low) // 64 * 64)
    cmd = [dump, "--seed", str(seed), "--count", "0", "--tasks", ",".join(tasks),
           "--min-length", str(lo), "--max-length", str(length)]
    for task, c in cpt.items():
        cmd += ["--cpt", f"{task}={c:.4f}"]
    return cmd


def calibrate(dump: str, tok, tasks: list[str], seed: int, lengths=(1024, 4096)) -> dict[str, float]:
    """Characters per token of each task in this tokenizer, measured on a few samples, so the
    dump sizes haystacks close to the bucket length (slightly under: 2% margin)."""
    cpt = {}
    for task in tasks:
        chars = tokens = 0
        for length in lengths:
            out = subprocess.run([dump, "--seed", str(seed), "--count", "2", "--length", str(length),
                                  "--tasks", task], check=True, capture_output=True, text=True).stdout
            for line in out.splitlines():
                s = json.loads(line)
                chars += len(s["context"]) + len(s["question"]) + len(s["answer_prefix"])
                tokens += len(prompt_ids(tok, s)) - 1
        cpt[task] = 0.98 * chars / max(tokens, 1)
    return cpt


class Schedule:
    """Which bucket lengths a batch may use as training goes on (progress in [0, 1]): short rows
    first, so retrieval is learnt cheaply, then the long ones. Weights are shares of batches,
    and every batch holds about the same number of tokens."""

    def __init__(self, buckets: list[int], curriculum: bool):
        self.buckets = buckets
        self.curriculum = curriculum

    def weights(self, progress: float) -> list[float]:
        n = len(self.buckets)
        if not self.curriculum or n == 1:
            return [1.0] * n
        # The largest bucket allowed grows in even steps over the first 60% of training; longer
        # buckets weigh more, the longest allowed most.
        allowed = max(min(2, n), min(n, 1 + int(progress / 0.6 * n)))
        w = [1.0 + 0.5 * i if i < allowed else 0.0 for i in range(n)]
        w[allowed - 1] += 1.0
        return w

    def pick(self, progress: float, rng: random.Random) -> int:
        return rng.choices(range(len(self.buckets)), weights=self.weights(progress))[0]


def worker(wid: int, cfg: dict, queue, progress, stop) -> None:
    """Builds batches forever (until `stop` is set). cfg: dump, tokenizer, buckets, tokens_per_batch,
    seed, cpt, tasks, low, curriculum."""
    os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(cfg["tokenizer"])
    parent = os.getppid()
    rng = random.Random(cfg["seed"] * 7919 + wid)
    sched = Schedule(cfg["buckets"], cfg["curriculum"])
    streams: dict[int, subprocess.Popen] = {}
    try:
        while not stop.is_set() and os.getppid() == parent:
            bi = sched.pick(progress.value, rng)
            length = cfg["buckets"][bi]
            if bi not in streams:
                seed = cfg["seed"] + 100 * wid + bi
                streams[bi] = subprocess.Popen(
                    dump_command(cfg["dump"], seed, length, cfg["cpt"], cfg["tasks"], cfg["low"]),
                    stdout=subprocess.PIPE, text=True, bufsize=1 << 20)
            src = streams[bi].stdout
            rows, dropped = [], 0
            want = max(1, cfg["tokens_per_batch"] // length)
            while len(rows) < want:
                sample = json.loads(src.readline())
                ids, kind = render(tok, sample)
                if sample["task"] == "text":  # plain text is cut to fit
                    ids, kind = ids[:length], kind[:length]
                if len(ids) > length:
                    dropped += 1
                    continue
                rows.append((ids, kind))
            ids, kind = pack(rows, length)
            while True:  # a trainer that was killed never reads again: leave when it is gone
                try:
                    queue.put((ids, kind, dropped), timeout=1.0)
                    break
                except queue_lib.Full:
                    if stop.is_set() or os.getppid() != parent:
                        return
    finally:
        for p in streams.values():
            p.kill()
            p.wait()
