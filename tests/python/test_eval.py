"""defkv-eval against a real defkv-server (models/stories260K, CPU): RULER-style runs with presses x
ratios, resuming, the tables, LongBench-format files, and the offline task dump. Sizes are tiny
(stories260K has a 512-token context and cannot solve the tasks): these tests check the harness,
not the model's accuracy."""
import csv
import json
import pathlib
import signal
import socket
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
LONGBENCH_TINY = REPO / "tests" / "eval" / "data" / "longbench_tiny.jsonl"
LENGTH = 480
MAX_NEW = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def eval_bin(bin_dir) -> pathlib.Path:
    for exe in ("defkv-eval", "defkv-server", "defkv"):
        if not (bin_dir / exe).is_file():
            pytest.fail(f"{bin_dir / exe} is missing: build it first (scripts/test does)")
    return bin_dir / "defkv-eval"


@pytest.fixture(scope="module")
def eval_server(bin_dir, repo_root, tmp_path_factory, eval_bin):
    """A server of its own (the shared one of integration/ caps prompts at 300 tokens)."""
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("eval-server") / "server.log", "w")
    proc = subprocess.Popen([str(bin_dir / "defkv-server"), f"--model={repo_root / 'models' / 'stories260K'}",
                             "--host=127.0.0.1", f"--port={port}", "--metrics_port=-1", "--threads=1",
                             "--max_queue=64"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            pytest.fail(f"defkv-server exited with {proc.returncode}")
        if subprocess.run([str(bin_dir / "defkv"), f"--addr={addr}", "--timeout=2", "health"],
                          capture_output=True).returncode == 0:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("defkv-server not SERVING after 30 s")
        time.sleep(0.1)
    yield addr
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def run_eval(eval_bin, addr, *args, timeout=120):
    return subprocess.run([str(eval_bin), f"--addr={addr}", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def rows(out_dir: pathlib.Path) -> list[dict]:
    with open(out_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


RULER_ARGS = ["ruler", f"--length={LENGTH}", "--samples=2", "--tasks=niah_single_1,niah_single_2,fwe",
              "--presses=none,snapkv", "--ratios=0.5", f"--max-new-tokens={MAX_NEW}", "--concurrency=3"]


def test_ruler_run_resume_and_table(eval_bin, eval_server, tmp_path):
    out = tmp_path / "run"
    first = run_eval(eval_bin, eval_server, *RULER_ARGS, f"--out={out}")
    assert first.returncode == 0, first.stderr
    assert "ETA" in first.stderr and "12 requests, 0 already done" in first.stderr
    got = rows(out)
    # 3 tasks x 2 samples x (none once + snapkv at 0.5)
    assert len(got) == 12
    assert {(r["press"], r["ratio"]) for r in got} == {("none", "0.0000"), ("snapkv", "0.5000")}
    for r in got:
        assert r["error"] == "" and r["score"] != ""
        # Sized by the server's own token counts: prompt + the answer budget fits the length.
        assert int(r["context_tokens"]) + int(r["question_tokens"]) + MAX_NEW <= LENGTH
        assert int(r["context_tokens"]) + int(r["question_tokens"]) + MAX_NEW > LENGTH * 0.8
        assert 0.0 <= float(r["score"]) <= 1.0
        if r["press"] == "snapkv":
            assert int(r["kv_entries_after"]) < int(r["kv_entries_before"])
    sizes = json.loads((out / "sizes.json").read_text())
    assert len(sizes) == 3 and all(v > 0 for v in sizes.values())

    table = (out / "table.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert "| cwe | fwe |" in header and "| qa_1 | qa_2 |" in header and "**avg**" in header
    assert any(line.startswith(f"| snapkv | {LENGTH} | 0.50 | 50% |") for line in table.splitlines())

    # Resume: nothing left to do, the file is unchanged.
    again = run_eval(eval_bin, eval_server, *RULER_ARGS, f"--out={out}")
    assert again.returncode == 0, again.stderr
    assert "12 requests, 12 already done" in again.stderr
    assert len(rows(out)) == 12

    # An interrupted run (the last rows lost, the last one cut mid-line) redoes only what is missing.
    text = (out / "results.csv").read_text()
    starts = [i + 1 for i in range(len(text)) if text.startswith("\nruler,", i)]  # predictions may hold newlines
    assert len(starts) == 12
    (out / "results.csv").write_text(text[:starts[9] + 40])  # rows 10-12: one cut mid-row, two lost
    third = run_eval(eval_bin, eval_server, *RULER_ARGS, f"--out={out}")
    assert third.returncode == 0, third.stderr
    assert "12 requests, 9 already done" in third.stderr, third.stderr
    done = {(r["task"], r["index"], r["press"]) for r in rows(out) if r["error"] == ""}
    assert len(done) == 12


def test_same_seed_same_predictions(eval_bin, eval_server, tmp_path):
    args = ["ruler", f"--length={LENGTH}", "--samples=1", "--tasks=niah_single_1", "--presses=none",
            f"--max-new-tokens={MAX_NEW}", "--seed=7"]
    a = run_eval(eval_bin, eval_server, *args, f"--out={tmp_path / 'a'}")
    b = run_eval(eval_bin, eval_server, *args, f"--out={tmp_path / 'b'}")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ra, rb = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [(r["prediction"], r["answers"], r["context_tokens"]) for r in ra] == \
           [(r["prediction"], r["answers"], r["context_tokens"]) for r in rb]


def test_task_too_long_for_the_length_is_skipped(eval_bin, eval_server, tmp_path):
    # cwe's few-shot example alone is over 1000 tokens of stories260K's small vocabulary.
    proc = run_eval(eval_bin, eval_server, "ruler", f"--length={LENGTH}", "--samples=1", "--tasks=cwe,niah_single_1",
                    "--presses=none", f"--max-new-tokens={MAX_NEW}", f"--out={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert f"cwe does not fit in {LENGTH} tokens" in proc.stderr
    assert [r["task"] for r in rows(tmp_path)] == ["niah_single_1"]


def test_longbench_file(eval_bin, eval_server, tmp_path):
    proc = run_eval(eval_bin, eval_server, "longbench", f"--data={LONGBENCH_TINY}", "--presses=none,snapkv",
                    "--ratios=0.5", "--max-new-tokens=8", "--concurrency=2", f"--out={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    got = rows(tmp_path)
    assert len(got) == 12 and all(r["suite"] == "longbench" and r["error"] == "" for r in got)
    assert {r["task"] for r in got} == {"hotpotqa", "trec", "passage_count", "passage_retrieval_en", "gov_report"}
    table = (tmp_path / "table.md").read_text()
    assert "| hotpotqa | trec | passage_count | passage_retrieval_en | gov_report |" in table


def test_tasks_dump_offline_is_deterministic(eval_bin, tmp_path):
    # No server: --chars-per-token sizes the haystacks from characters.
    args = [str(eval_bin), "tasks", "--length=2000", "--samples=2", "--chars-per-token=4", "--seed=3"]
    a = subprocess.run(args, capture_output=True, text=True, timeout=60)
    b = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    samples = [json.loads(line) for line in a.stdout.splitlines()]
    assert {s["task"] for s in samples} == {"cwe", "fwe", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
                                            "niah_multiquery", "niah_multivalue", "niah_single_1", "niah_single_2",
                                            "niah_single_3", "vt"}
    for s in samples:
        chars = len(s["context"]) + len(s["question"]) + len(s["answer_prefix"])
        # Sizing is done on sample 0 (as RULER does); the others differ by a few random keys.
        assert chars <= (2000 - s["max_new_tokens"]) * 4 * (1.0 if s["index"] == 0 else 1.02)
        if s["task"].startswith("niah"):
            for answer in s["answers"]:
                assert s["context"].count(answer) == 1


def test_bad_command_lines(eval_bin, eval_server, tmp_path):
    assert run_eval(eval_bin, eval_server, "ruler", "--tasks=qa_1", f"--out={tmp_path}").returncode == 64
    assert run_eval(eval_bin, eval_server, "ruler", "--ratios=1.5", f"--out={tmp_path}").returncode == 64
    assert run_eval(eval_bin, eval_server, "frobnicate").returncode == 64
    over = run_eval(eval_bin, eval_server, "ruler", "--length=4096", f"--out={tmp_path}")
    assert over.returncode == 64 and "over the server's prompt limit" in over.stderr


def test_plot(eval_bin, eval_server, tmp_path, repo_root):
    pytest.importorskip("matplotlib")  # tools/requirements.txt; the plot is optional for the harness
    import sys
    proc = run_eval(eval_bin, eval_server, "ruler", f"--length={LENGTH}", "--samples=1", "--tasks=niah_single_1",
                    "--presses=none,snapkv", "--ratios=0.25,0.5", f"--max-new-tokens={MAX_NEW}", f"--out={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    plot = subprocess.run([sys.executable, str(repo_root / "tools" / "plot_eval.py"), str(tmp_path / "results.csv")],
                          capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bearer_token(eval_bin, bin_dir, repo_root, tmp_path):
    """Against a server that requires a token: refused without it, runs with --token."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("s3cret-eval\n")
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(bin_dir / "defkv-server"), f"--model={repo_root / 'models' / 'stories260K'}",
                             "--host=127.0.0.1", f"--port={port}", "--metrics_port=-1", "--threads=1",
                             f"--auth_token_file={tokens}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        # health is exempt from the token check
        while subprocess.run([str(bin_dir / "defkv"), f"--addr={addr}", "--timeout=2", "health"],
                             capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        args = ["ruler", f"--length={LENGTH}", "--samples=1", "--tasks=niah_single_1", "--presses=none",
                f"--max-new-tokens={MAX_NEW}"]
        refused = run_eval(eval_bin, addr, *args, f"--out={tmp_path / 'a'}")
        assert refused.returncode == 16, refused.stderr  # UNAUTHENTICATED
        ok = run_eval(eval_bin, addr, "--token=s3cret-eval", *args, f"--out={tmp_path / 'b'}")
        assert ok.returncode == 0, ok.stderr
        assert len(rows(tmp_path / "b")) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
