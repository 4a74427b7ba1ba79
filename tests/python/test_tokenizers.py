"""Parity of defkv's tokenizers with HF tokenizers / transformers on generated text.

The C++ side runs through `defkv-tokenize`, one process per tokenizer with all requests sent at
once. The reference is the HF `tokenizers` backend: loaded from tokenizer.json directly, or built
by transformers from vocab.json + merges.txt / a SentencePiece .model (transformers' defaults,
i.e. legacy=False for Llama). Encoding never adds BOS/EOS (add_special_tokens=False).
"""
import json
import random
import shutil
import subprocess
import time
import unicodedata

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

# ---- test strings ----

WORDS = ("the quick brown fox jumps over lazy dog I you we they it's don't can't we'll "
         "HELLO World Tokenizer inference server cache press key value attention model "
         "naïve café résumé coöperate").split()
EMOJI = ["😀", "👍", "👍🏿", "👍🏻", "👩🏽‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "🇺🇸", "❤️", "🤷‍♀️",
         "🧑🏾‍🚀", "✌🏼", "🫠", "🐈‍⬛"]
COMBINING = ["e\u0301", "\u00e9", "a\u0308\u0304", "n\u0303", "\u00f1", "\u212b", "A\u030a",
             "\u1100\u1161\u11a8", "\uac01", "\u1ec7", "e\u0323\u0302", "o\u0302\u0323",
             "\u0915\u093c", "\u0958", "i\u0307", "\u0041\u0327\u0301", "\u03b1\u0301",
             "\u0433\u0306", "\u00c5\u0300"]
CODE = ['def f(x):\n    return x ** 2\n', 'for (int i = 0; i < n; ++i) { sum += a[i]; }',
        '<div class="a">hi</div>', '{"key": [1, 2, 3], "v": null}', 'SELECT * FROM t WHERE id=42;',
        '#include <vector>\nint main() {\n\treturn 0;\n}\n', 'x = [i*i for i in range(10)]  # sq',
        'fn main() -> Result<(), E> { Ok(()) }', '  if a && b || !c:\r\n    pass', "$ ls -la | grep '.py'"]
MIXED = ["Привет мир hello 世界", "مرحبا بالعالم 123", "שלום world", "नमस्ते दुनिया ok",
         "Ελληνικά και English", "日本語とEnglishの混在テキスト", "한국어 텍스트 Korean", "ไทย ภาษา",
         "Tiếng Việt có dấu", "Ünïcödé ßtraße ǅ ǈ ﬁ ﬀ"]


def _random_unicode(rng, n):
    out = []
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x52F), (0x590, 0x6FF), (0x900, 0x97F),
              (0x1E00, 0x1FFF), (0x2000, 0x2BFF), (0x3000, 0x30FF), (0x4E00, 0x9FFF),
              (0xAC00, 0xD7A3), (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF)]
    while len(out) < n:
        lo, hi = rng.choice(ranges)
        c = chr(rng.randint(lo, hi))
        if unicodedata.category(c) in ("Cn", "Cs", "Co", "Cc"):
            continue
        out.append(c)
    return "".join(out)


def make_strings(specials, seed=1234):
    rng = random.Random(seed)
    s = []
    for _ in range(40):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 14))]
        s.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", "", ",", "..."]))
    for _ in range(30):
        s.append("".join(chr(rng.choice([rng.randint(0x4E00, 0x9FFF), rng.randint(0x3041, 0x3096),
                                         rng.randint(0xAC00, 0xD7A3)]))
                         for _ in range(rng.randint(1, 20))))
    for _ in range(30):
        s.append(rng.choice(["", "I feel ", " "]) + "".join(rng.choice(EMOJI)
                                                          for _ in range(rng.randint(1, 6))))
    for c in COMBINING:
        s.append(c)
        s.append(f"word{c} {c}x {c}{c}")
    for _ in range(30):
        ws = "".join(rng.choice([" ", "  ", "\t", "\n", "\r\n", "\n\n", " \n", "\u3000", "\xa0"])
                     for _ in range(rng.randint(1, 6)))
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        s.append(rng.choice([f"{a}{ws}{b}", f"{ws}{a}", f"{a}{ws}", ws, f"{a} {b}{ws}"]))
    for k in range(1, 25):
        s.append("".join(str(rng.randint(0, 9)) for _ in range(k)))
        s.append(f"pi={rng.random() * 10 ** rng.randint(0, 8):.{rng.randint(0, 6)}f} and {rng.randint(0, 10**k)}")
    s.extend(CODE)
    for _ in range(40):
        t = rng.choice(specials)
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        s.append(rng.choice([f"{a} {t} {b}", f"{t}{a}", f"{a}{t}", f"{t}", f"{t}{t} {a}",
                             f" {t}\n{b}", f"{a}  {t}  "]))
    s.extend(MIXED)
    for _ in range(60):
        s.append(_random_unicode(rng, rng.randint(1, 30)))
    s.append("")
    s.append("a" * 3000)
    s.append(" ".join(rng.choice(WORDS) for _ in range(800)))
    return s


COMMON_SPECIALS = ["<s>", "</s>", "<unk>", "<|endoftext|>", "<|eot_id|>", "<|begin_of_text|>",
                   "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]", "<think>", "</think>",
                   "<0x41>", "<|start_header_id|>"]


# ---- running both sides ----

def run_cli(bin_dir, tokenizer_path, requests):
    exe = bin_dir / "defkv-tokenize"
    inp = "".join(json.dumps(r) + "\n" for r in requests)
    p = subprocess.run([str(exe), "--tokenizer", str(tokenizer_path)], input=inp.encode(),
                       capture_output=True, timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    out = [json.loads(line) for line in p.stdout.decode().split("\n") if line]
    assert len(out) == len(requests)
    return out


def hf_from_model_file(model_file, tmp_path):
    d = tmp_path / ("spm_" + model_file.name.replace(".", "_"))
    d.mkdir()
    shutil.copy(model_file, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return transformers.AutoTokenizer.from_pretrained(str(d))._tokenizer


def check_parity(bin_dir, path, hf, strings, nfc=False, lossless=None):
    reqs = []
    for s in strings:
        reqs.append({"op": "encode", "text": s, "parse_special": True})
        reqs.append({"op": "encode", "text": s, "parse_special": False})
    reqs.append({"op": "info"})
    out = run_cli(bin_dir, path, reqs)
    info = out[-1]
    failures = []
    hf.encode_special_tokens = False
    ref_special = [hf.encode(s, add_special_tokens=False).ids for s in strings]
    hf.encode_special_tokens = True
    ref_plain = [hf.encode(s, add_special_tokens=False).ids for s in strings]
    hf.encode_special_tokens = False
    ours = []
    for i, s in enumerate(strings):
        got, got_plain = out[2 * i]["ids"], out[2 * i + 1]["ids"]
        ours.append(got)
        if got != ref_special[i]:
            failures.append(("encode", s, got, ref_special[i]))
        if got_plain != ref_plain[i]:
            failures.append(("encode parse_special=false", s, got_plain, ref_plain[i]))
    # Decode our ids (equal to HF's where the above passed) with and without specials, and
    # stream them; compare with HF decode.
    dreqs = []
    for ids in ours:
        dreqs.append({"op": "decode", "ids": ids, "skip_special": False})
        dreqs.append({"op": "decode", "ids": ids, "skip_special": True})
        dreqs.append({"op": "stream", "ids": ids})
    dout = run_cli(bin_dir, path, dreqs)
    for i, (s, ids) in enumerate(zip(strings, ours)):
        ref = hf.decode(ids, skip_special_tokens=False)
        ref_skip = hf.decode(ids, skip_special_tokens=True)
        if dout[3 * i]["text"] != ref:
            failures.append(("decode", s, dout[3 * i]["text"], ref))
        if dout[3 * i + 1]["text"] != ref_skip:
            failures.append(("decode skip_special", s, dout[3 * i + 1]["text"], ref_skip))
        if "".join(dout[3 * i + 2]["pieces"]) != dout[3 * i]["text"]:
            failures.append(("stream", s, dout[3 * i + 2]["pieces"], dout[3 * i]["text"]))
    if lossless is not None:
        assert info["lossless"] == lossless, info
    if info["lossless"] or nfc:
        rt = run_cli(bin_dir, path, [{"op": "encode", "text": s, "parse_special": False}
                                     for s in strings])
        back = run_cli(bin_dir, path, [{"op": "decode", "ids": r["ids"]} for r in rt])
        for s, b in zip(strings, back):
            want = unicodedata.normalize("NFC", s) if nfc else s
            if b["text"] != want:
                failures.append(("roundtrip", s, b["text"], want))
    msg = "\n".join(f"{kind}: {s!r}\n  ours {a!r}\n  ref  {b!r}" for kind, s, a, b in failures[:8])
    assert not failures, f"{len(failures)} mismatches over {len(strings)} strings:\n{msg}"


def specials_of(hf):
    extra = [t.content for t in hf.get_added_tokens_decoder().values()][:40]
    return COMMON_SPECIALS + extra


# ---- the tokenizers ----

@pytest.mark.parametrize("name,nfc,lossless", [("llama3-hf", False, True),
                                               ("qwen3-hf", True, False)])
def test_tokenizer_json_byte_level(bin_dir, testdata, name, nfc, lossless):
    path = testdata / "tokenizers" / name
    hf = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    check_parity(bin_dir, path, hf, make_strings(specials_of(hf)), nfc=nfc, lossless=lossless)


def test_vocab_merges_qwen2(bin_dir, testdata):
    path = testdata / "tokenizers" / "qwen2"
    hf = transformers.AutoTokenizer.from_pretrained(str(path))._tokenizer
    check_parity(bin_dir, path, hf, make_strings(specials_of(hf)), nfc=True, lossless=False)


def test_stories260k_tokenizer_json(bin_dir, testdata):
    path = testdata / "models" / "stories260K" / "hf"
    hf = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    check_parity(bin_dir, path, hf, make_strings(specials_of(hf)), lossless=True)


@pytest.mark.parametrize("rel", ["llama2/tokenizer.model", "mistral/tokenizer.model.v1",
                                 "mistral/tokenizer.model.v3"])
def test_sentencepiece_model(bin_dir, testdata, tmp_path, rel):
    path = testdata / "tokenizers" / rel
    hf = hf_from_model_file(path, tmp_path)
    check_parity(bin_dir, path, hf, make_strings(specials_of(hf)), lossless=False)


def test_converted_llama2_tokenizer_json(bin_dir, testdata, tmp_path):
    hf = hf_from_model_file(testdata / "tokenizers" / "llama2" / "tokenizer.model", tmp_path)
    out = tmp_path / "converted"
    out.mkdir()
    hf.save(str(out / "tokenizer.json"))
    check_parity(bin_dir, out / "tokenizer.json", hf, make_strings(specials_of(hf)),
                 lossless=False)


# ---- streaming, errors, speed ----

@pytest.mark.parametrize("rel", ["tokenizers/llama3-hf", "models/stories260K/hf",
                                 "tokenizers/mistral/tokenizer.model.v3"])
def test_stream_random_ids(bin_dir, testdata, rel):
    path = testdata / rel
    info = run_cli(bin_dir, path, [{"op": "info"}])[0]
    rng = random.Random(7)
    streams = [[rng.randrange(info["vocab_size"]) for _ in range(rng.randint(1, 60))]
               for _ in range(200)]
    # Emoji / CJK spelled out with byte tokens (byte fallback) or split byte-level tokens.
    enc = run_cli(bin_dir, path, [{"op": "encode", "text": t} for t in
                                  ["👨‍👩‍👧‍👦 家族 🇯🇵", "naïve 日本語 😀😀", "\U0002A6D6\U0001FAE0"]])
    streams += [e["ids"] for e in enc]
    reqs = []
    for ids in streams:
        reqs.append({"op": "stream", "ids": ids})
        reqs.append({"op": "decode", "ids": ids})
    out = run_cli(bin_dir, path, reqs)
    for i in range(len(streams)):
        pieces, full = out[2 * i]["pieces"], out[2 * i + 1]["text"]
        assert "".join(pieces) == full, (streams[i], pieces, full)
        # json.loads would have failed on broken UTF-8; a lone surrogate would show here.
        for p in pieces:
            p.encode("utf-8")


def test_load_errors_name_the_file(bin_dir, tmp_path):
    cases = {"missing": tmp_path / "nope" / "tokenizer.json"}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{ not json")
    cases["corrupt"] = bad / "tokenizer.json"
    wp = tmp_path / "wp"
    wp.mkdir()
    (wp / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    cases["wordpiece"] = wp / "tokenizer.json"
    for what, path in cases.items():
        p = subprocess.run([str(bin_dir / "defkv-tokenize"), "--tokenizer", str(path)],
                           input=b"", capture_output=True, timeout=60)
        assert p.returncode == 2, what
        assert str(path) in p.stderr.decode(), (what, p.stderr)


def test_encode_100kb_fast(bin_dir, testdata):
    rng = random.Random(3)
    text = " ".join(rng.choice(WORDS) for _ in range(20000))[:100_000]
    text += "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(2000))
    t0 = time.perf_counter()
    run_cli(bin_dir, testdata / "tokenizers" / "llama3-hf", [{"op": "info"}])
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = run_cli(bin_dir, testdata / "tokenizers" / "llama3-hf",
                  [{"op": "encode", "text": text}] * 3)
    per_encode = (time.perf_counter() - t0 - load) / 3
    assert out[0]["ids"]
    assert per_encode < 1.0, per_encode
