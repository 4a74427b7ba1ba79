"""defkv's chat rendering against transformers' apply_chat_template(tokenize=False).

The llama3-hf template is Llama-3 (not 3.1): it has no date header and no strftime_now, and it
always ends with the assistant header whatever add_generation_prompt says; both sides agree.
The Mistral v3 [INST] template below is the no-tools part of Mistral-7B-Instruct-v0.3's.
"""
import json
import shutil
import subprocess

import pytest

transformers = pytest.importorskip("transformers")

MISTRAL_V3_TEMPLATE = (
    '{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}'
    '{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}'
    '{%- endif %}{{- bos_token }}{%- for message in loop_messages %}'
    '{%- if message["role"] == "user" %}{%- if loop.last and system_message is defined %}'
    '{{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}'
    '{%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{%- endif %}'
    '{%- elif message["role"] == "assistant" %}{{- " " + message["content"]|trim + eos_token}}'
    '{%- endif %}{%- endfor %}')

S = {"role": "system", "content": "You are terse.\n"}
U1 = {"role": "user", "content": "  Hello there!  "}
A1 = {"role": "assistant", "content": "Hi. How can I help?\n\n"}
U2 = {"role": "user", "content": "Tell me a joke about \u00e9l\u00e8ves and 🐈."}
A_THINK = {"role": "assistant", "content": "<think>\nLet me think.\n</think>\n\nWhy did the cat..."}
U_TOOL = {"role": "user", "content": "<tool_response>42</tool_response>"}

CONVERSATIONS = [
    [S, U1], [U1], [U1, A1, U2], [S, U1, A1, U2], [S, U1, A1], [U1, A_THINK],
    [U1, A_THINK, U2], [S, U1, A_THINK, U2, A1], [U1, A1, U_TOOL], [U2, A1, U1, A_THINK],
]


# A Llama-3.1-style template (no-tools branch): the system turn always exists and opens with
# the knowledge cut-off and today's date.
LLAMA31_TEMPLATE = (
    '{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}'
    '{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"]|trim %}'
    '{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}'
    '{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}{{- "Cutting Knowledge Date: December 2023\n" }}'
    '{{- "Today Date: " + date_string + "\n\n" }}{{- system_message }}{{- "<|eot_id|>" }}'
    '{%- for message in messages %}{{- "<|start_header_id|>" + message["role"] + "<|end_header_id|>\n\n" + '
    'message["content"] | trim + "<|eot_id|>" }}{%- endfor %}'
    '{%- if add_generation_prompt %}{{- "<|start_header_id|>assistant<|end_header_id|>\n\n" }}{%- endif %}')


def render_ours(bin_dir, tokenizer_path, cases, **extra):
    reqs = [{"op": "chat", "messages": m, "add_generation_prompt": g, **extra} for m, g in cases]
    p = subprocess.run([str(bin_dir / "defkv-tokenize"), "--tokenizer", str(tokenizer_path)],
                       input="".join(json.dumps(r) + "\n" for r in reqs).encode(),
                       capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    return [json.loads(line) for line in p.stdout.decode().split("\n") if line]


def check(bin_dir, path, hf, expect_format, **extra):
    cases = [(m, g) for m in CONVERSATIONS for g in (True, False)]
    ours = render_ours(bin_dir, path, cases, **extra)
    for (msgs, gen), got in zip(cases, ours):
        assert got.get("format") == expect_format, got
        want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **extra)
        assert got["text"] == want, (msgs, gen)


def test_qwen3_without_thinking_as_kvpress_renders(bin_dir, testdata):
    path = testdata / "tokenizers" / "qwen3-hf"
    check(bin_dir, path, transformers.AutoTokenizer.from_pretrained(str(path)), "chatml", enable_thinking=False)


def test_llama31_date_header(bin_dir, testdata, tmp_path):
    src = testdata / "tokenizers" / "llama3-hf"
    shutil.copy(src / "tokenizer.json", tmp_path)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = LLAMA31_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    check(bin_dir, tmp_path, hf, "llama3", date_string="03 Mar 2026")


@pytest.mark.parametrize("name,fmt", [("llama3-hf", "llama3"), ("qwen3-hf", "chatml")])
def test_chat_matches_transformers(bin_dir, testdata, name, fmt):
    path = testdata / "tokenizers" / name
    check(bin_dir, path, transformers.AutoTokenizer.from_pretrained(str(path)), fmt)


def test_mistral_v3_chat(bin_dir, testdata, tmp_path):
    shutil.copy(testdata / "tokenizers" / "mistral" / "tokenizer.model.v3",
                tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": MISTRAL_V3_TEMPLATE}))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    # Mistral's template only takes alternating user/assistant turns after a system message.
    global CONVERSATIONS
    saved = CONVERSATIONS
    CONVERSATIONS = [[S, U1], [U1], [U1, A1, U2], [S, U1, A1, U2], [S, U1, A1], [U1, A_THINK]]
    try:
        check(bin_dir, tmp_path, hf, "mistral")
    finally:
        CONVERSATIONS = saved


def test_plain_without_template(bin_dir, testdata):
    out = render_ours(bin_dir, testdata / "tokenizers" / "llama2" / "tokenizer.model",
                      [([S, U1], True)])
    assert out[0] == {"format": "plain", "text": S["content"] + "\n" + U1["content"]}


def test_unknown_template_is_an_error(bin_dir, testdata, tmp_path):
    shutil.copy(testdata / "models" / "stories260K" / "hf" / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    out = render_ours(bin_dir, tmp_path, [([U1], True)])
    assert "tokenizer_config.json" in out[0]["error"]
