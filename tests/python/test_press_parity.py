"""Press parity: defkv's presses against kvpress (the installed version) and against the
DefensiveKV / Layer-DefensiveKV reference in tools/defensivekv_reference.py, on the tiny random
models, fp32 on CPU.

  1. kvpress presses: the kept (layer, kv head, position) entries equal kvpress's own decision, up
     to exact score ties (entries at their head's boundary score by kvpress's own scores are told
     apart for the per-head top-k presses; at most TIE_TOLERANCE of the other entries may differ,
     summed over the cases of a (press, family)), and greedy answers equal the kvpress pipeline's.
  2. DefensiveKV / Layer-DefensiveKV: the same against the reference, with positive stage-1 caps
     and one negative cap (clamped to 0).
  3. Memory: kept counts follow each press's rounding rule, and --report's entries and bytes equal
     the kept entries x 2 (K and V) x head_dim x 4 bytes.
  4. Bad input exits 2 with a precise message; ratio 0 and press none give the full-cache answer.

Every mismatch count is printed (pytest -rP shows it) and collected in
build/press_parity_summary.json.
"""
import json
import os
import pathlib
import sys

import pytest

import press_utils as pu

FAMILIES = ["llama_gqa2", "qwen3", "mistral"]  # GQA 2:1 (H=2), 4:1 with q/k norm (H=1), 4:1 (H=2)
TIE_TOLERANCE = 0.005
MAX_NEW_TOKENS = 12
# DEFKV_PARITY_FULL=1 runs every (context length, ratio) pair and more families (about 3x longer).
FULL = os.environ.get("DEFKV_PARITY_FULL", "") not in ("", "0")
# (context tokens, compression ratio) per (press, family). The default set keeps the file under
# about 3 minutes on 2 cores: every ratio, every length, the window (16) larger than the budget
# (80, 0.8 keeps 15 per head) and a long context at a high ratio.
CASES = ([(L, r) for L in (80, 150, 260) for r in (0.25, 0.5, 0.8)] if FULL else
         [(80, 0.8), (150, 0.5), (260, 0.25), (260, 0.8)])
DEFENSIVE_FAMILIES = FAMILIES + (["llama_linear_bias", "qwen2"] if FULL else ["qwen2"])
# L=90, cr=0.8, w=16: n(1-cr) - w = 74*0.2 - 16 = -1.2, so the stage-1 cap is clamped to 0;
# every other case has a positive cap (21, 51, 32, ...).
DEFENSIVE_CASES = ([(L, r) for L in (90, 150, 260) for r in (0.5, 0.8)] if FULL else
                   [(90, 0.5), (90, 0.8), (150, 0.5), (260, 0.8)])
MEMORY_CASES = [(150, 0.5), (260, 0.8)]  # shared with the parity runs above (no extra runs)
LENGTHS = sorted({L for L, _ in CASES + DEFENSIVE_CASES + MEMORY_CASES} | {150})

SUMMARY: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def summary_file(build_dir):
    yield
    if SUMMARY:
        out = build_dir / "press_parity_summary.json"
        out.write_text(json.dumps(SUMMARY, indent=1) + "\n")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("press_parity")


@pytest.fixture(scope="module")
def contexts(workdir) -> dict:
    """Context length (tokens, bos included) -> (text, file)."""
    out = {}
    for L in LENGTHS + [10]:
        text = pu.context_text(L)
        path = workdir / f"context_{L}.txt"
        path.write_text(text)
        out[L] = (text, path)
    return out


_RUNS: dict = {}


def cpp_runs(bin_dir, workdir, cases) -> list:
    """cases: (model dir, press, L context file, ratio). Runs the ones not run yet in this session
    two at a time, and returns every case's CppRun (with --kept-json and --report)."""
    todo = []
    for model, press, ctx, ratio in cases:
        key = (str(model), press, str(ctx), ratio)
        if key not in _RUNS:
            kept_json = workdir / f"kept_{model.name}_{press}_{ctx.stem}_{ratio}.json"
            todo.append((key, pu.generate_args(model, ctx, press, ratio, pu.press_options(press),
                                               max_new_tokens=MAX_NEW_TOKENS, kept_json=kept_json)))
    for (key, _), run in zip(todo, pu.run_cpp_many(bin_dir, [a for _, a in todo])):
        _RUNS[key] = run
    return [_RUNS[(str(m), p, str(c), r)] for m, p, c, r in cases]


def kept_ok(run) -> str | None:
    """None when the run succeeded and wrote a sane kept json, else why not."""
    if run.returncode != 0 or run.kept is None:
        return run.describe()
    pos = run.kept["positions"]
    if not pos and all(n == run.kept["context_tokens"] for layer in run.kept["kept"] for n in layer):
        return None  # nothing was evicted: defkv writes no positions
    if [[len(h) for h in layer] for layer in pos] != run.kept["kept"]:
        return "kept counts disagree with the positions lists"
    for layer in pos:
        for h in layer:
            if h != sorted(set(h)) or (h and (h[0] < 0 or h[-1] >= run.kept["context_tokens"])):
                return "positions are not ascending, unique and inside the context"
    return None


# ------------------------------------------------------------------------------------------------
# 1. kvpress parity
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("press", pu.KVPRESS_PRESSES)
def test_kvpress_parity(press, family, tiny_models, bin_dir, workdir, contexts):
    model = tiny_models / family
    cases = CASES
    runs = cpp_runs(bin_dir, workdir, [(model, press, contexts[L][1], r) for L, r in cases])  # all at once
    mismatches = ties = total = 0
    problems, answer_diffs, tie_answer_diffs, lines = [], [], [], []
    for (L, r), run in zip(cases, runs):
        bad = kept_ok(run)
        if bad:
            problems.append(f"L={L} cr={r}: {bad}")
            continue
        scores = {}
        ref_kept, ref_answer = pu.kvpress_run(model, press, r, contexts[L][0], max_new_tokens=MAX_NEW_TOKENS,
                                              scores=scores)
        assert run.kept["context_tokens"] == L
        m, t, details = pu.kept_difference(ref_kept, run.kept["positions"])
        tied = pu.per_head_ties(ref_kept, run.kept["positions"], scores) if press in pu.PER_HEAD_TOPK else 0
        mismatches += m - tied
        ties += tied
        total += t
        same_answer = run.kept["answer"] == ref_answer
        lines.append(f"L={L} cr={r}: {m}/{t} kept entries differ ({tied} at an exact tie), "
                     f"answer {'equal' if same_answer else 'differs'}")
        if m:
            lines += ["    " + d for d in details[:4]]
        if not same_answer:
            why = f"kvpress {ref_answer!r}, defkv {run.kept['answer']!r}"
            # A different kept set (ties) may change the answer; the same kept set must not.
            (tie_answer_diffs if m else answer_diffs).append(f"L={L} cr={r} ({m} kept entries differ): {why}")
    frac = mismatches / total if total else 0.0
    SUMMARY.append({"test": "kvpress", "press": press, "family": family, "mismatches": mismatches,
                    "tie_mismatches": ties, "entries": total, "answer_diffs": answer_diffs,
                    "answer_diffs_after_ties": tie_answer_diffs, "errors": problems})
    report = (f"{press} on {family}: {mismatches}/{total} = {100 * frac:.3f}% kept entries differ beyond exact ties "
              f"({ties} more at exact ties)\n" + "\n".join(lines))
    print(report)
    assert not problems, "defkv-generate failed:\n" + "\n".join(problems)
    assert frac <= TIE_TOLERANCE, report
    assert not answer_diffs, report + "\nanswers differ with equal kept sets:\n" + "\n".join(answer_diffs)


# ------------------------------------------------------------------------------------------------
# 2. DefensiveKV / Layer-DefensiveKV against the reference
# ------------------------------------------------------------------------------------------------

_REF_MODELS: dict = {}


def reference_model(model_dir):
    if str(model_dir) not in _REF_MODELS:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        _REF_MODELS[str(model_dir)] = (model, tok)
    return _REF_MODELS[str(model_dir)]


@pytest.fixture(scope="module")
def reference(repo_root):
    sys.path.insert(0, str(repo_root / "tools"))
    import defensivekv_reference
    return defensivekv_reference


def test_toy_example(reference):
    """§4.5 / oracle 20: the reference reproduces the spec's worked example."""
    t = reference.toy_example()
    close = lambda a, b: all(abs(x - y) < 5e-5 for x, y in zip(a, b))  # noqa: E731
    assert close(t["pooled"][0, 0].tolist(), [.10909, .13636, .15000, .08182, .06818, .05455])
    assert close(t["pooled"][1, 1].tolist(), [.12857, .12857, .12857, .10714, .10714, .00000])
    assert close(t["M"].tolist(), [.15789, .15789, .15789, .10909, .10714, .09818])
    assert abs(t["mu"] - .13135) < 5e-5
    assert close(t["S"].tolist(), [.15789, .15789, .15789, .13135, .13135, .13135])
    assert close(t["p"].tolist(), [.41667, .07083, .23750, .05000, .14583, .07917])
    assert t["protected"] == [0, 2, 4, 5]
    assert reference.stage1_cap(74, 0.8, 16) == 0 and reference.stage1_cap(244, 0.8, 16) == 32


def tied_entries(ref_kept, got_kept, details, boundary) -> int:
    """How many of the differing entries (as pu.kept_difference counts them) sit exactly at the
    selection's boundary score, by the reference's scores: there either choice is right."""
    n = 0
    for layer, (rl, gl) in enumerate(zip(ref_kept, got_kept)):
        scores = details[layer]["scores"]
        for h, (rh, gh) in enumerate(zip(rl, gl)):
            only_ref, only_got = set(rh) - set(gh), set(gh) - set(rh)
            tie_ref = sum(float(scores[h, t]) == boundary[layer] for t in only_ref)
            tie_got = sum(float(scores[h, t]) == boundary[layer] for t in only_got)
            counted = max(len(only_ref), len(only_got))
            n += counted - max(len(only_ref) - tie_ref, len(only_got) - tie_got)
    return n


@pytest.mark.parametrize("family", DEFENSIVE_FAMILIES)
@pytest.mark.parametrize("press", ["defensivekv", "layer_defensivekv"])
def test_defensive_parity(press, family, tiny_models, bin_dir, workdir, contexts, reference):
    model_dir = tiny_models / family
    model, tok = reference_model(model_dir)
    cases = DEFENSIVE_CASES
    runs = cpp_runs(bin_dir, workdir, [(model_dir, press, contexts[L][1], r) for L, r in cases])
    mismatches = ties = total = 0
    problems, lines, caps = [], [], set()
    for (L, r), run in zip(cases, runs):
        bad = kept_ok(run)
        if bad:
            problems.append(f"L={L} cr={r}: {bad}")
            continue
        ids = reference.context_ids(tok, contexts[L][0])
        assert len(ids) == L == run.kept["context_tokens"]
        layer_wise = press == "layer_defensivekv"
        ref_kept, details = reference.reference_kept(model, ids, r, layer_wise, window=pu.WINDOW)
        caps.add((L - pu.WINDOW) * (1 - r) - pu.WINDOW >= 0)
        m, t, diff = pu.kept_difference(ref_kept, run.kept["positions"])
        tied = tied_entries(ref_kept, run.kept["positions"], details,
                            reference.boundary_scores(details, r, layer_wise))
        mismatches += m - tied
        ties += tied
        total += t
        lines.append(f"L={L} cr={r} cap={details[0]['cap']} stage-1 sizes "
                     f"{[[len(s) for s in d['stage1']] for d in details]}: {m}/{t} kept entries differ, "
                     f"{tied} of them at an exact tie")
        lines += ["    " + d for d in diff[:4]]
    assert caps == {True, False} or problems, "the cases must cover a positive and a negative stage-1 cap"
    frac = mismatches / total if total else 0.0
    SUMMARY.append({"test": "defensive", "press": press, "family": family, "mismatches": mismatches,
                    "tie_mismatches": ties, "entries": total, "errors": problems})
    report = (f"{press} on {family}: {mismatches}/{total} = {100 * frac:.3f}% kept entries differ beyond exact ties "
              f"({ties} more at exact ties)\n" + "\n".join(lines))
    print(report)
    assert not problems, "defkv-generate failed:\n" + "\n".join(problems)
    assert frac <= TIE_TOLERANCE, report


@pytest.mark.parametrize("press", ["defensivekv", "layer_defensivekv"])
def test_reference_cli(press, tiny_models, bin_dir, workdir, contexts, reference, monkeypatch):
    """The reference's command line (run in-process) writes what defkv's --kept-json holds."""
    model_dir, (L, r) = tiny_models / "llama_gqa2", DEFENSIVE_CASES[-1]
    out = workdir / f"reference_{press}.json"
    monkeypatch.setattr(sys, "argv", ["defensivekv_reference.py", "--model", str(model_dir), "--context-file",
                                      str(contexts[L][1]), "--ratio", str(r), "--window", str(pu.WINDOW),
                                      "--out", str(out)] + (["--layer"] if press == "layer_defensivekv" else []))
    assert reference.main() == 0
    ref = json.loads(out.read_text())
    run, = cpp_runs(bin_dir, workdir, [(model_dir, press, contexts[L][1], r)])
    assert kept_ok(run) is None, kept_ok(run)
    assert (ref["press"], ref["context_tokens"]) == (run.kept["press"], run.kept["context_tokens"])
    m, t, diff = pu.kept_difference(ref["positions"], run.kept["positions"])
    assert m / t <= TIE_TOLERANCE, diff


# ------------------------------------------------------------------------------------------------
# 3. Memory: kept counts and reported bytes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("press", pu.ALL_PRESSES)
def test_kept_counts_and_bytes(press, tiny_models, bin_dir, workdir, contexts):
    plan = [(tiny_models / f, L, r) for f in FAMILIES for L, r in ([(150, 0.0)] if press == "none" else MEMORY_CASES)]
    runs = cpp_runs(bin_dir, workdir, [(m, press, contexts[L][1], r) for m, L, r in plan])
    problems = []
    for (model_dir, L, r), run in zip(plan, runs):
        where = f"{model_dir.name} L={L} cr={r}"
        bad = kept_ok(run)
        if bad:
            problems.append(f"{where}: {bad}")
            continue
        n_layers, H, head_dim = pu.model_shape(model_dir)
        kept = run.kept["kept"]
        rule = pu.check_counts(kept, pu.expected_counts(press, L, r, H, n_layers))
        if rule:
            problems.append(f"{where}: {rule}")
        rep = pu.parse_report(run.stderr)
        if rep is None:
            problems.append(f"{where}: no 'entries A -> B, bytes C -> D' line in --report output")
            continue
        before, after, bytes_before, bytes_after = rep
        n_kept = sum(map(sum, kept))
        entry_bytes = 2 * head_dim * 4
        if before != n_layers * H * L or bytes_before != before * entry_bytes:
            problems.append(f"{where}: before compression {before} entries / {bytes_before} bytes, expected "
                            f"{n_layers * H * L} / {n_layers * H * L * entry_bytes}")
        if after != n_kept or bytes_after != n_kept * entry_bytes:
            problems.append(f"{where}: after compression {after} entries / {bytes_after} bytes, expected "
                            f"{n_kept} / {n_kept * entry_bytes}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# 4. Bad input, ratio 0 and press none
# ------------------------------------------------------------------------------------------------

BAD_INPUTS = {
    # name: (extra arguments, words the message must contain)
    "unknown_press": (["--press", "snapkvv", "--compression-ratio", "0.5"], ["snapkvv"] + pu.ALL_PRESSES),
    "negative_ratio": (["--press", "snapkv", "--compression-ratio", "-0.1"], ["-0.1", "[0, 1)"]),
    "ratio_one": (["--press", "snapkv", "--compression-ratio", "1.0"], ["1", "[0, 1)"]),
    "ratio_nan": (["--press", "snapkv", "--compression-ratio", "nan"], ["nan"]),
    "unknown_option": (["--press", "snapkv", "--compression-ratio", "0.5", "--press-option", "windowsize=16"],
                       ["windowsize", "window_size"]),
    "option_of_another_press": (["--press", "knorm", "--compression-ratio", "0.5", "--press-option",
                                 "window_size=16"], ["knorm", "window_size"]),
    "option_type": (["--press", "snapkv", "--compression-ratio", "0.5", "--press-option", "window_size=abc"],
                    ["window_size", "abc"]),
    "short_context": (["--press", "snapkv", "--compression-ratio", "0.5", "--press-option", "window_size=16"],
                      ["window", "16", "10"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2(case, tiny_models, bin_dir, contexts):
    extra, words = BAD_INPUTS[case]
    ctx = contexts[10 if case == "short_context" else 150][1]
    args = ["--model", str(tiny_models / "llama_gqa2"), "--context-file", str(ctx), "--question", pu.QUESTION,
            "--max-new-tokens", "4", "--quiet", "--threads", "1", *extra]
    run = pu.run_cpp(bin_dir, args)
    assert run.returncode == 2, run.describe()
    missing = [w for w in words if w.lower() not in run.stderr.lower()]
    assert not missing, f"message lacks {missing}:\n{run.stderr}"
    for crash in ("terminate called", "Segmentation", "Aborted", "what():"):
        assert crash not in run.stderr, run.stderr


@pytest.mark.parametrize("family", ["llama_gqa2", "qwen3"] if FULL else ["qwen3"])
def test_ratio_zero_keeps_everything(family, tiny_models, bin_dir, workdir, contexts):
    """Every press at ratio 0, and press none, keeps the whole context and answers exactly like
    the uncompressed kvpress pipeline."""
    model_dir = tiny_models / family
    L = 150
    _, full_answer = pu.kvpress_run(model_dir, "none", 0.0, contexts[L][0], max_new_tokens=MAX_NEW_TOKENS)
    n_layers, H, _ = pu.model_shape(model_dir)
    cases = [(model_dir, p, contexts[L][1], 0.0) for p in pu.ALL_PRESSES]
    problems = []
    for (_, press, _, _), run in zip(cases, cpp_runs(bin_dir, workdir, cases)):
        bad = kept_ok(run)
        if bad:
            problems.append(f"{press}: {bad}")
            continue
        if run.kept["kept"] != [[L] * H] * n_layers:
            problems.append(f"{press}: kept {run.kept['kept']}, expected everything")
        if run.kept["answer"] != full_answer:
            problems.append(f"{press}: answer {run.kept['answer']!r} != full cache {full_answer!r}")
        if run.stdout != run.kept["answer"] + "\n":
            problems.append(f"{press}: stdout {run.stdout!r} is not the answer and a newline")
    assert not problems, "\n".join(problems)

