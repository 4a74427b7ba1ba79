"""Faults the server must survive without costing other requests their work: cancellation
storms, 1 ms deadlines, and a request whose KV cache cannot fit in memory."""
import concurrent.futures
import json
import shutil

import grpc


def normal_answer(pb, server):
    r = server.stub().Generate(pb.defkv.GenerateRequest(question="Once upon a time", use_chat_template=False,
                                                        max_new_tokens=8), timeout=60)
    assert r.usage.generated_tokens == 8
    return r.text


def test_cancellation_storm(server, pb):
    before = normal_answer(pb, server)
    stub = server.stub()

    def cancel_early(i):
        call = stub.GenerateStream(pb.defkv.GenerateRequest(question="Once upon a time", use_chat_template=False,
                                                            max_new_tokens=200, request_id=f"storm-{i}"), timeout=60)
        if i % 2:
            next(call, None)  # some after the first delta, some before anything arrives
        call.cancel()
        return call.code()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(cancel_early, range(48)))
    assert all(c == grpc.StatusCode.CANCELLED for c in codes), codes
    assert normal_answer(pb, server) == before  # the same greedy answer as before the storm
    assert server.proc.poll() is None


def test_one_millisecond_deadlines(server, pb):
    stub = server.stub()
    req = pb.defkv.GenerateRequest(question="Once upon a time", use_chat_template=False, max_new_tokens=64)

    def call(_):
        try:
            stub.Generate(req, timeout=0.001)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(call, range(40)))
    assert all(c == grpc.StatusCode.DEADLINE_EXCEEDED for c in codes), codes
    normal_answer(pb, server)
    assert server.proc.poll() is None


def test_kv_cache_that_cannot_fit_is_resource_exhausted(start_server, pb, model_dir, tmp_path):
    # stories260K with a context window far beyond memory: 400M tokens of KV at 1280 bytes each.
    big = tmp_path / "long-context-model"
    shutil.copytree(model_dir, big)
    cfg = json.loads((big / "config.json").read_text())
    cfg["max_position_embeddings"] = 1_000_000_000
    (big / "config.json").write_text(json.dumps(cfg))
    s = start_server(f"--model={big}", "--max_new_tokens_limit=500000000")
    stub = s.stub()
    try:
        stub.Generate(pb.defkv.GenerateRequest(question="Once upon a time", use_chat_template=False,
                                               max_new_tokens=400_000_000), timeout=60)
        raise AssertionError("a 512 GB KV cache was accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
        # The default budget is a fraction of the memory free after loading, far below 512 GB.
        assert "needs 512000007680 bytes" in e.details() and "KV budget" in e.details(), e.details()
    normal_answer(pb, s)
    assert "RESOURCE_EXHAUSTED" in s.logs()
