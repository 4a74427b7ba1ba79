"""The defkv CLI against the shared server: each command, text streaming, context from a file or
stdin, JSON output, and exit codes that follow the gRPC status code."""
import json

from server_harness import CONTEXT, MAX_NEW_TOKENS_LIMIT, QUESTION, free_port, in_process


def generate_args(tmp_path, *extra):
    ctx = tmp_path / "context.txt"
    ctx.write_text(CONTEXT)
    return ["generate", f"--context-file={ctx}", "--question", QUESTION, "--max-new-tokens", "24", *extra]


def test_health(cli):
    proc = cli("health")
    assert proc.returncode == 0 and proc.stdout == "SERVING\n"


def test_info(cli):
    proc = cli("info")
    assert proc.returncode == 0, proc.stderr
    assert "llama" in proc.stdout and "kv heads 4" in proc.stdout
    info = json.loads(cli("info", "--json").stdout)
    assert info["num_layers"] == "5" and info["device"] == "cpu"  # int64 is a string in proto3 JSON


def test_presses(cli, server, pb):
    proc = cli("presses")
    assert proc.returncode == 0, proc.stderr
    names = [p.name for p in server.stub().ListPresses(pb.defkv.ListPressesRequest(), timeout=10).presses]
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line and not line.startswith(" ")]
    assert listed == names
    assert [p["name"] for p in json.loads(cli("presses", "--json").stdout)["presses"]] == names


def test_generate_matches_in_process_generator(cli, tmp_path, bin_dir, model_dir):
    rc, expected, err = in_process(bin_dir, model_dir, tmp_path)
    assert rc == 0, err
    plain = cli(*generate_args(tmp_path))
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == expected + "\n"
    assert "finish=FINISH_REASON_LENGTH" in plain.stderr and "generated=24" in plain.stderr
    stream = cli(*generate_args(tmp_path, "--stream"))
    assert stream.returncode == 0, stream.stderr
    assert stream.stdout == expected + "\n"


def test_context_from_stdin(cli, tmp_path):
    from_file = cli(*generate_args(tmp_path))
    from_stdin = cli("generate", "--question", QUESTION, "--max-new-tokens", "24", input=CONTEXT)
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == from_file.stdout


def test_json_output(cli, tmp_path):
    resp = json.loads(cli(*generate_args(tmp_path, "--json", "--request-id", "cli-json")).stdout)
    assert resp["request_id"] == "cli-json" and resp["finish_reason"] == "FINISH_REASON_LENGTH"
    assert int(resp["usage"]["generated_tokens"]) == 24 and len(resp["token_ids"]) == 24
    assert resp["timings"]["total"] > 0
    lines = [json.loads(l) for l in cli(*generate_args(tmp_path, "--json", "--stream")).stdout.splitlines()]
    assert all("delta" in l for l in lines[:-1]) and lines[-1]["final"]["text"] == resp["text"]
    assert "".join(l["delta"]["text"] for l in lines[:-1]) == resp["text"]


def test_exit_codes_follow_grpc_status(cli, tmp_path):
    bad_press = cli(*generate_args(tmp_path, "--press", "bogus"))
    assert bad_press.returncode == 3 and "unknown press 'bogus'" in bad_press.stderr
    assert bad_press.stderr.startswith("defkv: INVALID_ARGUMENT: ")
    too_many = cli(*generate_args(tmp_path, "--max-new-tokens", str(MAX_NEW_TOKENS_LIMIT + 1)))
    assert too_many.returncode == 3 and f"limit of {MAX_NEW_TOKENS_LIMIT}" in too_many.stderr
    ctx = tmp_path / "long.txt"
    ctx.write_text(CONTEXT * 3)
    too_long = cli("generate", f"--context-file={ctx}", "--question", "Why?")
    assert too_long.returncode == 11, too_long.stderr  # OUT_OF_RANGE
    slow = cli("generate", "--question", "Once", "--max-new-tokens", str(MAX_NEW_TOKENS_LIMIT), "--timeout", "0.05",
               input="")
    assert slow.returncode == 4, slow.stderr  # DEADLINE_EXCEEDED
    nobody = cli("health", "--timeout", "2", addr=f"127.0.0.1:{free_port()}")
    assert nobody.returncode == 14, nobody.stderr  # UNAVAILABLE
    assert cli("generate").returncode == 64  # no --question: a command-line error, not a gRPC one
    assert cli("frobnicate").returncode == 64
    assert cli("--help").returncode == 0
