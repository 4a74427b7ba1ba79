"""tools/train: the RULER dump is the eval's generator and deterministic, the project tokenizer
encodes alike in C++ and HF, a tiny CPU training run resumes at its saved step and exports a bf16
HF directory, and defkv-generate's greedy tokens on the served model equal transformers'."""
import json
import pathlib
import subprocess
import sys

import pytest

from test_tokenizers import check_parity, make_strings, specials_of

REPO = pathlib.Path(__file__).resolve().parents[2]
TRAIN = REPO / "tools" / "train"
TOKENIZER = TRAIN / "tokenizer"
SERVED = REPO / "models" / "defkv-niah-7m"

sys.path.insert(0, str(TRAIN))
import data  # noqa: E402


@pytest.fixture(scope="module")
def dump(bin_dir):
    exe = bin_dir / "ruler-dump"
    if not exe.exists():
        pytest.fail(f"{exe} is missing: build the ruler-dump target")
    return str(exe)


def run_dump(dump, *args):
    return subprocess.run([dump, *args], check=True, capture_output=True, text=True, timeout=60).stdout


def test_dump_is_deterministic_by_seed(dump):
    args = ["--count", "40", "--min-length", "256", "--max-length", "2048", "--tasks", "all,text"]
    a = run_dump(dump, "--seed", "1001", *args)
    assert a == run_dump(dump, "--seed", "1001", *args)
    assert a != run_dump(dump, "--seed", "1002", *args)
    rows = [json.loads(line) for line in a.splitlines()]
    assert len(rows) >= 20 and all(r["length"] % 64 == 0 and 256 <= r["length"] <= 2048 for r in rows)
    assert len({r["task"] for r in rows}) >= 8 and "text" in {r["task"] for r in rows}
    # --start continues the same stream.
    tail = run_dump(dump, "--seed", "1001", "--start", "12", *args[:1], "28", *args[2:])
    assert [json.loads(x)["index"] for x in tail.splitlines()] == [r["index"] for r in rows if r["index"] >= 12]


def test_dump_builds_defkv_eval_samples(dump, bin_dir):
    """Same seed and sizing rule as `defkv-eval tasks --chars-per-token`: the very same samples."""
    for task in ("niah_single_2", "vt", "fwe"):
        ours = run_dump(dump, "--seed", "42", "--tasks", task, "--length", "1024", "--count", "2",
                        "--chars-per-token", "3.5")
        p = subprocess.run([str(bin_dir / "defkv-eval"), "tasks", "--tasks", task, "--length", "1024",
                            "--samples", "2", "--seed", "42", "--chars-per-token", "3.5"],
                           check=True, capture_output=True, text=True, timeout=60)
        for mine, theirs in zip(ours.splitlines(), p.stdout.splitlines(), strict=True):
            a, b = json.loads(mine), json.loads(theirs)
            for k in ("context", "question", "answer_prefix", "answers", "max_new_tokens"):
                assert a[k] == b[k], (task, k)


def test_project_tokenizer_matches_hf(bin_dir, dump):
    tokenizers = pytest.importorskip("tokenizers")
    texts = []
    for line in run_dump(dump, "--seed", "1003", "--count", "30", "--length", "512", "--tasks", "all,text").splitlines():
        s = json.loads(line)
        texts += [s["context"], s["question"] + "\n" + s["answer_prefix"], data.answer_text(s)]
    for d in (TOKENIZER, SERVED):
        if not (d / "tokenizer.json").exists():
            continue
        hf = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        check_parity(bin_dir, d, hf, make_strings(specials_of(hf)) + texts, lossless=True)
        # Digits are single tokens: a 7-digit needle is 7 tokens wherever it stands.
        assert len(hf.encode(" is: 1234567.", add_special_tokens=False).ids) == 11


def test_model_equals_transformers_llama(tmp_path):
    """model.py computes what transformers' LlamaForCausalLM computes on the exported weights."""
    import torch
    from transformers import AutoModelForCausalLM
    import export
    import model as model_lib
    cfg = {"vocab_size": 4096, "hidden": 64, "intermediate": 96, "layers": 2, "heads": 4, "kv_heads": 2,
           "max_position": 16384, "rope_theta": 100000.0}
    torch.manual_seed(0)
    ours = model_lib.Llama(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_((p + 0.3 * torch.randn_like(p)).to(torch.bfloat16).float())  # bf16-exact weights
    export.export(ours.state_dict(), cfg, TOKENIZER, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
    ids = torch.randint(3, 4096, (2, 300))
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


@pytest.fixture(scope="module")
def tiny_run(dump, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    base = [sys.executable, str(TRAIN / "train.py"), "--dump", dump, "--tokenizer", str(TOKENIZER),
            "--out", str(out), "--device", "cpu", "--hidden", "32", "--intermediate", "64", "--layers", "2",
            "--heads", "2", "--kv-heads", "1", "--min-len", "256", "--max-len", "256",
            "--tokens-per-batch", "512", "--workers", "1", "--tasks", "niah_single_1,text",
            "--log-every", "1", "--warmup-steps", "2"]
    first = subprocess.run(base + ["--max-steps", "3"], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(base + ["--max-steps", "5", "--resume"], capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    return out, first.stdout, second.stdout


def test_resume_continues_at_saved_step(tiny_run):
    out, first, second = tiny_run
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert "step 3, run 1" in second
    assert "stopped at step 5" in second
    import torch
    ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 5 and ck["run_index"] == 1


def test_export_is_bf16_hf_directory(tiny_run):
    from safetensors import safe_open
    out = tiny_run[0] / "model"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    assert all(p.stat().st_size < 16 * 1024 * 1024 for p in out.iterdir())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
        assert "lm_head.weight" not in f.keys()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"] and cfg["tie_word_embeddings"]


def test_export_loads_in_transformers_and_defkv(tiny_run, bin_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    out = tiny_run[0] / "model"
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) > 0
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("The grass is green.\n")
    p = subprocess.run([str(bin_dir / "defkv-generate"), "--model", str(out), "--context-file", str(ctx),
                        "--question", "What is green?", "--max-new-tokens", "4"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_served_model_greedy_equals_transformers(bin_dir, dump, tmp_path):
    """The committed model: defkv-generate (bf16 weights computed in fp32 on CPU) and transformers
    (fp32) give the same greedy tokens on RULER prompts rendered the server's way."""
    if not (SERVED / "config.json").exists():
        pytest.skip(f"{SERVED} is not there")
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    tok = Tokenizer.from_file(str(SERVED / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(str(SERVED), dtype=torch.float32).eval()
    for line in run_dump(dump, "--seed", "1004", "--count", "3", "--length", "512",
                         "--tasks", "niah_single_1,niah_single_2,vt").splitlines():
        s = json.loads(line)
        ids = data.prompt_ids(tok, s)
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                 eos_token_id=data.EOS, pad_token_id=data.PAD)
        expected = [t for t in gen[0, len(ids):].tolist() if t != data.EOS]
        ctx = tmp_path / "ctx.txt"
        ctx.write_text(s["context"])
        p = subprocess.run([str(bin_dir / "defkv-generate"), "--model", str(SERVED), "--context-file", str(ctx),
                            "--question", s["question"], "--answer-prefix", s["answer_prefix"],
                            "--max-new-tokens", "16", "--ids"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        got = [int(x) for x in p.stderr.split("generated ids")[1].split(":", 1)[1].split("\n")[0].split()]
        assert got == expected, (s["task"], got, expected)
