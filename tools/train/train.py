#!/usr/bin/env python3
"""Trains defkv's small retrieval model: a Llama (GQA, RoPE, tied embeddings) on RULER-style
samples from ruler-dump (every task, seeds far from defkv-eval's 42) plus a little plain text.

Loss: cross-entropy on every token (language model) plus --answer-weight times the mean
cross-entropy of the answer tokens (the few tokens that decide the score). Rows are grouped in
buckets of one length (512 ... --max-len); a curriculum starts with short rows. Batches are built
by worker processes (data.py) while the GPU trains.

Time-boxed and resumable: --minutes is this run's budget (training stops early enough to write
the checkpoint and export inside it); --total-minutes is the whole schedule across runs (the
learning rate and curriculum follow it); --resume continues from OUT/ckpt.pt at its step.

  python3 tools/train/train.py --dump build-train/ruler-dump --tokenizer tools/train/tokenizer \\
      --out build-train/run --minutes 8 [--resume] [--device cuda]

Writes OUT/ckpt.pt (periodically and at the end), OUT/log.jsonl, and the HF export in OUT/model
(or --export DIR).
"""
import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import pathlib
import queue as queue_lib
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are processes, not threads
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import data  # noqa: E402
import export as export_lib  # noqa: E402
import model as model_lib  # noqa: E402

MODEL_KEYS = ("vocab_size", "hidden", "intermediate", "layers", "heads", "kv_heads", "max_position",
              "rope_theta")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump", required=True, help="the ruler-dump binary")
    ap.add_argument("--tokenizer", required=True, type=pathlib.Path, help="folder with tokenizer.json")
    ap.add_argument("--out", required=True, type=pathlib.Path)
    ap.add_argument("--export", type=pathlib.Path, help="HF export folder (default OUT/model)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads of torch (0 = its default)")
    ap.add_argument("--minutes", type=float, default=0, help="this run's time budget (0 = none)")
    ap.add_argument("--total-minutes", type=float, default=0, help="schedule length (default: --minutes)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this step (0 = none)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt if it exists")
    ap.add_argument("--ckpt-minutes", type=float, default=2.0, help="checkpoint period")
    # model
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--max-position", type=int, default=16384)
    ap.add_argument("--rope-theta", type=float, default=100000.0)
    # data
    ap.add_argument("--min-len", type=int, default=512, help="shortest bucket")
    ap.add_argument("--max-len", type=int, default=8192, help="longest bucket")
    ap.add_argument("--low", type=float, default=0.6, help="rows of bucket L are [low*L, L] tokens")
    ap.add_argument("--tokens-per-batch", type=int, default=262144)
    ap.add_argument("--tasks", default="all,text")
    ap.add_argument("--no-curriculum", action="store_true")
    ap.add_argument("--workers", type=int, default=0, help="batch builders (default: CPUs - 2)")
    ap.add_argument("--seed", type=int, default=1000, help="data and init seed (>= 1000: eval uses 42)")
    # optimisation
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--answer-weight", type=float, default=2.0)
    ap.add_argument("--log-every", type=int, default=20)
    a = ap.parse_args(argv)
    if a.seed == 42:
        ap.error("--seed 42 is defkv-eval's seed: train on other samples")
    if not a.total_minutes:
        a.total_minutes = a.minutes
    if not a.minutes and not a.max_steps:
        ap.error("give --minutes or --max-steps")
    return a


def build_model(cfg: dict, device):
    return model_lib.Llama(cfg).to(device)


def make_optimizer(model, a, device):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def lr_at(step: int, progress: float, a) -> float:
    if step < a.warmup_steps:
        return a.lr * (step + 1) / a.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def loss_terms(model, ids, kind, answer_weight: float, autocast: bool):
    """ids [B, L] int64, kind [B, L] uint8 (data.py). Returns (loss, lm_loss, answer_loss,
    answer_correct, answer_count, sample_correct, samples)."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids)
    targets = torch.roll(ids, -1, dims=1)
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(ids)
    valid = kind > 0
    answer = kind == data.ANSWER
    n_valid = valid.sum().clamp(min=1)
    n_answer = answer.sum()
    lm = (ce * valid).sum() / n_valid
    ans = (ce * answer).sum() / n_answer.clamp(min=1)
    loss = lm + answer_weight * ans
    with torch.no_grad():
        right = logits.argmax(-1) == targets
        correct = (right & answer).sum()
        has_answer = answer.any(1)
        sample_ok = ((right | ~answer).all(1) & has_answer).sum()
    return loss, lm.detach(), ans.detach(), correct, n_answer, sample_ok, has_answer.sum()


def save_checkpoint(path: pathlib.Path, model, opt, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), **state}, tmp)
    os.replace(tmp, path)


def main(argv=None) -> None:
    a = parse_args(argv)
    t_start = time.time()
    a.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = a.out / "ckpt.pt"
    export_dir = a.export or a.out / "model"
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)

    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(a.tokenizer / "tokenizer.json"))
    assert tok.token_to_id("<pad>") == data.PAD and tok.token_to_id("<s>") == data.BOS \
        and tok.token_to_id("</s>") == data.EOS, "tokenizer specials must be <pad>=0 <s>=1 </s>=2"

    ck = None
    if a.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model_cfg = ck["model_cfg"] if ck else {
        "vocab_size": tok.get_vocab_size(), "hidden": a.hidden, "intermediate": a.intermediate,
        "layers": a.layers, "heads": a.heads, "kv_heads": a.kv_heads, "max_position": a.max_position,
        "rope_theta": a.rope_theta}
    step = ck["step"] if ck else 0
    trained_s = ck["trained_s"] if ck else 0.0
    run_index = ck["run_index"] + 1 if ck else 0
    total_s = a.total_minutes * 60 if a.total_minutes else 0

    # Data workers first: forked before CUDA is touched (they never use torch), so they start at
    # once without importing anything again.
    tasks = [t for t in a.tasks.split(",") if t]
    ruler = subprocess.run([a.dump, "--list-tasks"], check=True, capture_output=True, text=True).stdout.split()
    used = sorted({t for t in tasks for t in (ruler if t == "all" else [t])})
    cpt = data.calibrate(a.dump, tok, used, seed=a.seed + 999)
    buckets = []
    L = a.min_len
    while L <= a.max_len:
        buckets.append(L)
        L *= 2
    wcfg = {"dump": a.dump, "tokenizer": str(a.tokenizer / "tokenizer.json"), "buckets": buckets,
            "tokens_per_batch": a.tokens_per_batch, "seed": a.seed + 100000 * run_index, "cpt": cpt,
            "tasks": tasks, "low": a.low, "curriculum": not a.no_curriculum}
    n_workers = a.workers or max(1, (os.cpu_count() or 4) - 2)
    ctx = mp.get_context("fork")
    q = ctx.Queue(maxsize=2 * n_workers + 2)
    progress = ctx.Value("d", trained_s / total_s if total_s else 0.0, lock=False)
    stop = ctx.Event()
    procs = [ctx.Process(target=data.worker, args=(w, wcfg, q, progress, stop), daemon=True)
             for w in range(n_workers)]
    for p in procs:
        p.start()

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model = build_model(model_cfg, device)
    opt = make_optimizer(model, a, device)
    if ck:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        del ck
    n_params = sum(p.numel() for p in model.parameters())
    cpt_text = json.dumps({k: round(v, 2) for k, v in cpt.items()})
    print(f"train: {n_params / 1e6:.2f}M parameters, {model_cfg}, device {device}, buckets {buckets}, "
          f"{n_workers} workers, step {step}, run {run_index}, chars/token {cpt_text}", flush=True)

    log = open(a.out / "log.jsonl", "a")
    autocast = device.type == "cuda"
    # On the GPU only flash (or memory-efficient) attention: never the quadratic-memory fallback.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    def attention_kernels():
        if device.type != "cuda":
            return contextlib.nullcontext()
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
    budget_end = t_start + a.minutes * 60 if a.minutes else float("inf")
    reserve = 20.0  # seconds kept for the last checkpoint and the export
    t_loop = time.time()
    last_ckpt = t_loop
    acc = torch.zeros(7, device=device, dtype=torch.float64)
    tokens = dropped = wait_s = 0.0
    t_log = time.time()
    step_s = 0.0
    model.train()
    while True:
        now = time.time()
        if a.max_steps and step >= a.max_steps:
            break
        if now + reserve + 2 * step_s > budget_end:
            break
        elapsed = trained_s + (now - t_loop)
        prog = elapsed / total_s if total_s else (step / a.max_steps if a.max_steps else 0.0)
        progress.value = prog
        t0 = time.time()
        while True:
            try:
                ids_np, kind_np, n_drop = q.get(timeout=1.0)
                break
            except queue_lib.Empty:
                if not any(p.is_alive() for p in procs):
                    raise SystemExit("train: every data worker died")
        wait_s += time.time() - t0
        ids = torch.from_numpy(ids_np).to(device, non_blocking=True).long()
        kind = torch.from_numpy(kind_np).to(device, non_blocking=True)
        lr = lr_at(step, prog, a)
        for g in opt.param_groups:
            g["lr"] = lr
        with attention_kernels():
            loss, lm, ans, corr, n_ans, s_ok, n_s = loss_terms(model, ids, kind, a.answer_weight, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        acc += torch.stack([lm.double(), ans.double(), corr.double(), n_ans.double(), s_ok.double(),
                            n_s.double(), torch.ones((), device=device, dtype=torch.float64)])
        tokens += float((kind_np > 0).sum())
        dropped += n_drop
        step_s = 0.9 * step_s + 0.1 * (time.time() - t0) if step > 1 else time.time() - t0
        if step % a.log_every == 0:
            v = acc.tolist()
            dt = time.time() - t_log
            done = trained_s + time.time() - t_loop
            eta = (budget_end - time.time()) if a.minutes else (a.max_steps - step) * step_s
            rec = {"step": step, "lr": lr, "len": ids_np.shape[1], "lm_loss": v[0] / v[6], "answer_loss": v[1] / v[6],
                   "answer_acc": v[2] / max(v[3], 1), "sample_acc": v[4] / max(v[5], 1),
                   "tok_s": tokens / dt, "data_wait": wait_s / dt, "dropped": dropped,
                   "progress": prog, "elapsed_s": done, "eta_s": eta}
            print(f"step {step:6d} len {rec['len']:5d} lm_loss {rec['lm_loss']:.3f} ans_loss {rec['answer_loss']:.3f} "
                  f"ans_acc {rec['answer_acc']:.3f} sample_acc {rec['sample_acc']:.3f} lr {lr:.2e} "
                  f"{rec['tok_s'] / 1e3:.0f}K tok/s wait {rec['data_wait']:.0%} p {prog:.2f} eta {eta:.0f}s",
                  flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            acc.zero_()
            tokens = dropped = wait_s = 0.0
            t_log = time.time()
        if time.time() - last_ckpt > a.ckpt_minutes * 60:
            save_checkpoint(ckpt_path, model, opt, {"step": step, "trained_s": trained_s + time.time() - t_loop,
                                                    "run_index": run_index, "model_cfg": model_cfg,
                                                    "args": {k: str(v) for k, v in vars(a).items()}})
            last_ckpt = time.time()
    stop.set()
    trained_s += time.time() - t_loop
    save_checkpoint(ckpt_path, model, opt, {"step": step, "trained_s": trained_s, "run_index": run_index,
                                            "model_cfg": model_cfg, "args": {k: str(v) for k, v in vars(a).items()}})
    files = export_lib.export(model.state_dict(), model_cfg, a.tokenizer, export_dir)
    print(f"train: stopped at step {step} after {trained_s:.0f}s of training; checkpoint {ckpt_path}; "
          f"export {export_dir}: " + ", ".join(f"{f.name} {f.stat().st_size}" for f in files), flush=True)
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(timeout=5)


if __name__ == "__main__":
    main()
