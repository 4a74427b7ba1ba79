"""defkv-generate end to end: greedy continuations equal transformers' generate() on every tiny
family model, stories260K reproduces its golden story, and broken inputs exit non-zero with a
message (never a crash)."""
import json
import pathlib
import re
import shutil
import subprocess

import pytest

FAMILIES = ["llama_gqa2", "llama3_scaled_tied", "llama_linear_bias", "qwen2", "qwen3", "mistral"]
PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,", "x = 1 + 2\nprint(x)"]


def run_generate(bin_dir, *args, check=True):
    proc = subprocess.run([str(bin_dir / "defkv-generate"), *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"defkv-generate failed ({proc.returncode}): {proc.stderr}")
    return proc


def generated_ids(stderr: str) -> list[int]:
    m = re.search(r"^generated ids \(\d+\):(.*)$", stderr, re.M)
    assert m, stderr
    return [int(x) for x in m.group(1).split()]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers(family, tiny_models, bin_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_models / family
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=2,
                                 pad_token_id=0)
        expected = [t for t in out[0, len(ids):].tolist() if t != 2]
        proc = run_generate(bin_dir, "--model", str(d), "--prompt", prompt, "--max-new-tokens", "16", "--ids")
        assert generated_ids(proc.stderr) == expected, prompt
        assert proc.stdout == tok.decode(expected, skip_special_tokens=True) + "\n"


def test_stories260k_golden_story(testdata, bin_dir):
    root = testdata / "models" / "stories260K"
    golden = json.loads((root / "golden.json").read_text())["greedy_fp32"]["once_upon_a_time"]
    proc = run_generate(bin_dir, "--model", str(root / "hf"), "--prompt", golden["text"],
                        "--max-new-tokens", str(len(golden["greedy_next_80"])), "--ids")
    assert generated_ids(proc.stderr) == golden["greedy_next_80"]
    assert proc.stdout == golden["decoded"] + "\n"
    assert "finish=length" in proc.stderr


def test_context_file_and_question(testdata, bin_dir, tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("Once upon a time, there was a little girl named Lily.")
    proc = run_generate(bin_dir, "--model", str(testdata / "models" / "stories260K" / "hf"), "--context-file",
                        str(ctx), "--question", "She loved", "--max-new-tokens", "8", "--ids")
    assert re.search(r"^context ids \(\d+\): 1 ", proc.stderr, re.M), proc.stderr
    assert len(generated_ids(proc.stderr)) == 8


def broken_copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case,expect", [
    ("no_dir", "does not exist"),
    ("corrupt_config", "config.json"),
    ("truncated_weights", "truncated"),
    ("unknown_type", "bloom"),
    ("no_tokenizer", "tokenizer"),
])
def test_broken_model_exits_2_with_a_message(case, expect, tiny_models, bin_dir, tmp_path):
    d = broken_copy(tiny_models / "llama_gqa2", tmp_path / "m")
    if case == "no_dir":
        d = tmp_path / "absent"
    elif case == "corrupt_config":
        (d / "config.json").write_text('{"model_type": ')
    elif case == "truncated_weights":
        w = d / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
    elif case == "unknown_type":
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = "bloom"
        (d / "config.json").write_text(json.dumps(cfg))
    elif case == "no_tokenizer":
        (d / "tokenizer.json").unlink()
    proc = run_generate(bin_dir, "--model", str(d), "--prompt", "hi", check=False)
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr
    assert "cannot load model" in proc.stderr


def test_bad_arguments_exit_2(bin_dir):
    assert run_generate(bin_dir, "--prompt", "x", check=False).returncode == 2
    proc = run_generate(bin_dir, "--model", "m", "--bogus", check=False)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr
    proc = run_generate(bin_dir, "--model", "m", "--prompt", "x", "--max-new-tokens", "ten", check=False)
    assert proc.returncode == 2 and "expects a number" in proc.stderr
    assert "usage:" in run_generate(bin_dir, "--help").stdout
