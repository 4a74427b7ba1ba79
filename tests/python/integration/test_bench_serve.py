"""defkv-bench-serve against a real defkv-server (stories260K, one thread): closed and open loop
with a mix of presses, the JSON report's invariants, request errors counted without ending the
run, Ctrl-C ending a run with its report, a bearer token, and clean failures for a bad address or
a bad command line."""
import json
import signal
import subprocess
import time

import pytest

from server_harness import free_port

MIX = "snapkv:0.5=2,none=1,knorm:0.25=1"
LABELS = {"snapkv:0.5", "none:0", "knorm:0.25"}


@pytest.fixture(scope="module")
def bench_server(start_server):
    return start_server("--max_queue=64")


@pytest.fixture(scope="module")
def bench(bin_dir):
    exe = bin_dir / "defkv-bench-serve"
    if not exe.is_file():
        pytest.fail(f"{exe} is missing: build it first (scripts/test does)")

    def run(*args, timeout=120):
        return subprocess.run([str(exe), "--no-progress", *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    return run


def run_json(bench, server, *args):
    proc = bench(f"--addr={server.addr}", "--json", "--seed=1", f"--mix={MIX}", "--context-tokens=uniform:80:200",
                 "--max-new-tokens=8,16", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def check_ordered(latency):
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = latency[name]
        assert s["count"] > 0, name
        assert 0 <= s["p50"] <= s["p95"] <= s["p99"] <= s["max"], (name, s)


def check_run(report, n):
    totals = report["totals"]
    assert totals["sent"] == n and totals["completed"] == n and totals["failed"] == 0, totals
    assert report["errors"] == {}
    assert totals["output_tokens"] > 0 and totals["output_tokens_per_s"] > 0
    assert totals["requests_per_s"] > 0 and totals["mean_in_flight"] > 0
    check_ordered(report["latency"])
    groups = {g["label"]: g for g in report["groups"]}
    assert set(groups) == LABELS
    assert sum(g["sent"] for g in groups.values()) == n
    assert sum(g["output_tokens"] for g in groups.values()) == totals["output_tokens"]
    # Calibrated sizing lands near the asked-for context length (the tokenizer is tiny and the
    # sample small, hence the loose bound).
    assert abs(totals["mean_context_tokens"] / totals["mean_target_context_tokens"] - 1) < 0.25, totals
    return groups


def test_closed_and_open_loop(bench, bench_server):
    closed = run_json(bench, bench_server, "--concurrency=3", "--requests=8", "--warmup=1")
    groups = check_run(closed, 8)
    assert closed["config"]["mode"] == "closed" and closed["config"]["concurrency"] == 3
    assert 1 <= closed["totals"]["max_in_flight"] <= 3
    assert closed["totals"]["max_send_lag_s"] is None

    opened = run_json(bench, bench_server, "--mode=open", "--rate=20", "--requests=8", "--warmup=0")
    check_run(opened, 8)
    assert opened["config"]["mode"] == "open" and opened["config"]["rate"] == 20
    assert opened["totals"]["max_send_lag_s"] is not None and opened["totals"]["max_send_lag_s"] >= 0
    # Request i depends only on the seed and i: both runs sent the same mix.
    assert {g["label"]: g["sent"] for g in opened["groups"]} == {k: g["sent"] for k, g in groups.items()}


def test_text_report(bench, bench_server):
    proc = bench(f"--addr={bench_server.addr}", "--requests=2", "--warmup=0", "--mix=none,snapkv:0.5",
                 "--context-tokens=100", "--max-new-tokens=4")
    assert proc.returncode == 0, proc.stderr
    for needle in ("closed loop", "TTFT", "ITL", "none:0", "snapkv:0.5", "output tokens"):
        assert needle in proc.stdout, proc.stdout


def test_request_errors_are_counted(bench, bench_server):
    # snapkv has no option "bogus": those requests fail with INVALID_ARGUMENT, the others run.
    proc = bench(f"--addr={bench_server.addr}", "--json", "--requests=6", "--warmup=0", "--concurrency=2",
                 "--mix=snapkv:0.5,none", "--option=snapkv/bogus=1", "--context-tokens=100", "--max-new-tokens=4")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    groups = {g["label"]: g for g in report["groups"]}
    assert groups["snapkv:0.5"]["failed"] == groups["snapkv:0.5"]["sent"] > 0
    assert groups["none:0"]["failed"] == 0 and groups["none:0"]["completed"] > 0
    assert report["errors"]["INVALID_ARGUMENT"]["count"] == groups["snapkv:0.5"]["sent"]
    assert "bogus" in report["errors"]["INVALID_ARGUMENT"]["example"]

    every = bench(f"--addr={bench_server.addr}", "--json", "--requests=2", "--warmup=0", "--mix=snapkv:0.5",
                  "--option=bogus=1", "--context-tokens=100", "--max-new-tokens=4")
    assert every.returncode == 1, "every request failed"
    assert json.loads(every.stdout)["totals"]["failed"] == 2


def test_bad_address_and_bad_command_lines(bench, bench_server):
    proc = bench(f"--addr=127.0.0.1:{free_port()}", "--requests=2", timeout=60)
    assert proc.returncode == 14, (proc.returncode, proc.stderr)  # UNAVAILABLE
    assert "cannot reach" in proc.stderr and proc.stdout == ""

    for args in (["--mix=nosuchpress"], ["--mode=open"], ["--mode=open", "--rate=1", "--concurrency=2"],
                 ["--concurency=2"], ["--context-tokens=uniform:9:3"], ["--context-tokens=100000"],
                 ["--mix=snapkv:1.5"]):
        proc = bench(f"--addr={bench_server.addr}", *args)
        assert proc.returncode == 64, (args, proc.returncode, proc.stderr)
        assert "defkv-bench-serve:" in proc.stderr and proc.stdout == "", args


def test_bearer_token(bench, start_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("bench-secret\n")
    s = start_server(f"--auth_token_file={tokens}")
    args = (f"--addr={s.addr}", "--json", "--requests=2", "--warmup=0", "--context-tokens=60", "--max-new-tokens=4")
    refused = bench(*args)
    assert refused.returncode == 16 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
    ok = bench(*args, "--token=bench-secret")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["totals"]["completed"] == 2


def test_interrupt_reports_what_was_sent(bin_dir, bench_server):
    args = [str(bin_dir / "defkv-bench-serve"), "--no-progress", f"--addr={bench_server.addr}", "--json", "--mode=open",
            "--rate=5", "--duration=120", "--warmup=0", "--context-tokens=100", "--max-new-tokens=8"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    totals = json.loads(out)["totals"]
    assert totals["sent"] > 0 and totals["completed"] == totals["sent"] and totals["duration_s"] < 60
