"""Server lifecycle and load: NOT_SERVING while the model loads, admission control (a full queue
answers RESOURCE_EXHAUSTED), SIGTERM drains (NOT_SERVING, new work refused, running work
finishes, exit 0), and a real Prometheus server scraping /metrics."""
import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import grpc
import pytest

from server_harness import free_port

LONG = 400  # tokens; stories260K needs a good fraction of a second for these


def long_request(pb, **kw):
    fields = dict(question="Once upon a time", use_chat_template=False, max_new_tokens=LONG)
    fields.update(kw)
    return pb.defkv.GenerateRequest(**fields)


def test_full_queue_is_resource_exhausted(start_server, pb):
    server = start_server("--max_queue=1")
    stub = server.stub()
    barrier = threading.Barrier(6)

    def call(i):
        barrier.wait()
        try:
            stub.Generate(long_request(pb), timeout=120)
            return "OK", ""
        except grpc.RpcError as e:
            return e.code().name, e.details()

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, range(6)))
    codes = [c for c, _ in results]
    # At most one runs and one waits (the engine may not have picked up the first yet); the rest
    # are refused at once.
    assert codes.count("OK") in (1, 2), results
    assert codes.count("RESOURCE_EXHAUSTED") >= 1, results
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, results
    assert all("queue is full" in d for c, d in results if c == "RESOURCE_EXHAUSTED")
    assert 'defkv_requests_total{code="RESOURCE_EXHAUSTED",press="none"}' in server.metrics()
    assert stub.Generate(long_request(pb, max_new_tokens=4), timeout=30).usage.generated_tokens == 4


def test_sigterm_drains_and_exits_zero(start_server, pb):
    server = start_server("--drain_grace_seconds=60")
    stream = server.stub().GenerateStream(long_request(pb, max_new_tokens=500 - 8), timeout=120)
    first = next(stream)
    assert first.HasField("delta")
    server.proc.send_signal(15)
    # While the running request finishes: not serving, and new work is refused.
    deadline = time.monotonic() + 5
    while server.health() != pb.health.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    with pytest.raises(grpc.RpcError) as e:
        server.stub().Generate(long_request(pb, max_new_tokens=2), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    rest = list(stream)
    assert rest[-1].HasField("final")
    assert first.delta.text + "".join(m.delta.text for m in rest[:-1]) == rest[-1].final.text
    assert server.proc.wait(timeout=30) == 0
    logs = server.logs()
    assert "draining" in logs and "drained=true" in logs


def test_grace_period_cancels_what_is_left(start_server, pb):
    server = start_server("--drain_grace_seconds=0.05")
    stream = server.stub().GenerateStream(long_request(pb), timeout=120)
    next(stream)
    server.proc.send_signal(15)
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.proc.wait(timeout=30) == 0


def test_prometheus_scrapes_requests_total(server, pb, tmp_path):
    prometheus = shutil.which("prometheus")
    if not prometheus:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("prometheus is not installed (Debian package prometheus)")
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    server.stub().Generate(pb.defkv.GenerateRequest(question="Hi", max_new_tokens=2), timeout=30)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: defkv\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.metrics_port}']\n")
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([prometheus, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
                             f"--storage.tsdb.path={tmp_path / 'data'}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        query = urllib.parse.urlencode({"query": 'sum(defkv_requests_total{code="OK"})'})
        deadline = time.monotonic() + 20  # target discovery alone takes about 5 s
        value = None
        while time.monotonic() < deadline and value is None:
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=2) as r:
                    result = json.load(r)["data"]["result"]
            except OSError:
                continue
            if result:
                value = float(result[0]["value"][1])
        assert value is not None, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert value >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_startup_failures_exit_non_zero(bin_dir, tmp_path):
    server = str(bin_dir / "defkv-server")
    common = ["--host=127.0.0.1", f"--port={free_port()}", "--metrics_port=-1"]
    bad_model = subprocess.run([server, f"--model={tmp_path}", *common], capture_output=True, text=True, timeout=60)
    assert bad_model.returncode == 1
    assert "model failed to load" in bad_model.stderr and "grpc listening" in bad_model.stderr
    bad_flag = subprocess.run([server, "--log_format=xml", *common], capture_output=True, text=True, timeout=60)
    assert bad_flag.returncode == 2 and "--log_format must be text or json" in bad_flag.stderr
    for flag in ("--stats_interval_s=-1", "--cuda_graph_max_batch=-2"):
        bad = subprocess.run([server, flag, *common], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "bad flags" in bad.stderr, (flag, bad.stderr)
        assert flag.split("=")[0] in bad.stderr
    help_text = subprocess.run([server, "--help"], capture_output=True, text=True, timeout=60).stdout
    for flag in ("--model", "--host", "--port", "--metrics_port", "--device", "--dtype", "--max_queue",
                 "--max_context_tokens", "--max_new_tokens_limit", "--log_format", "--log_level",
                 "--drain_grace_seconds", "--max_receive_message_bytes", "--cuda_graph_max_batch",
                 "--stats_interval_s"):
        assert flag in help_text, flag


def big_model(src: "pathlib.Path", dst: "pathlib.Path"):
    """A zero-weight Llama of ~540 MB (stories260K's tokenizer): slow enough to load that the
    server is seen while it loads."""
    import torch
    from safetensors.torch import save_file
    dst.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / f, dst / f)
    hidden, inter, layers, vocab = 1024, 4096, 8, 512
    cfg = dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
               num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
               rms_norm_eps=1e-5, tie_word_embeddings=True, torch_dtype="float32", bos_token_id=1, eos_token_id=2)
    (dst / "config.json").write_text(json.dumps(cfg))
    w = {"model.embed_tokens.weight": torch.zeros(vocab, hidden), "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(hidden)
        w[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        for n in ("q", "k", "v", "o"):
            w[p + f"self_attn.{n}_proj.weight"] = torch.zeros(hidden, hidden)
        w[p + "mlp.gate_proj.weight"] = torch.zeros(inter, hidden)
        w[p + "mlp.up_proj.weight"] = torch.zeros(inter, hidden)
        w[p + "mlp.down_proj.weight"] = torch.zeros(hidden, inter)
    save_file(w, str(dst / "model.safetensors"))


def test_not_serving_while_loading(bin_dir, model_dir, pb, tmp_path):
    import pathlib
    big_model(pathlib.Path(model_dir), tmp_path / "big")
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(bin_dir / "defkv-server"), f"--model={tmp_path / 'big'}", "--host=127.0.0.1",
                             f"--port={port}", "--metrics_port=-1", "--threads=1"], stdout=log, stderr=subprocess.STDOUT)
    seen, refused = set(), None
    try:
        # Wait for the port with plain connects first: a gRPC channel that tries too early backs
        # off for about a second, longer than the load lasts, and would only ever see SERVING.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.005)
        fast_retry = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.max_reconnect_backoff_ms", 50)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=fast_retry) as ch:
            health = pb.health_grpc.HealthStub(ch)
            stub = pb.defkv_grpc.DefKVStub(ch)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    status = health.Check(pb.health.HealthCheckRequest(service="defkv.v1.DefKV"), timeout=2).status
                except grpc.RpcError:
                    time.sleep(0.01)  # not listening yet
                    continue
                seen.add(status)
                if status == pb.health.HealthCheckResponse.NOT_SERVING and refused is None:
                    try:
                        stub.Generate(pb.defkv.GenerateRequest(question="hi", max_new_tokens=1), timeout=5)
                    except grpc.RpcError as e:
                        refused = e.code()
                if status == pb.health.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.01)
    finally:
        proc.send_signal(2)
        proc.wait(timeout=30)
        log.close()
    assert pb.health.HealthCheckResponse.NOT_SERVING in seen, (tmp_path / "server.log").read_text()
    assert pb.health.HealthCheckResponse.SERVING in seen, (tmp_path / "server.log").read_text()
    assert refused == grpc.StatusCode.UNAVAILABLE
