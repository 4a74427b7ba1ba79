"""Continuous batching on the real server (issue 8): requests decoded together give the same greedy
outputs as when each is served alone, admission counts a KV memory budget first come first
served, and memory is handed back when requests end or are cancelled."""
import re
import threading
import time

import grpc
import pytest

from server_harness import CONTEXT, QUESTION

# Four presses (and full cache), different ratios, contexts and lengths: the batch mixes them.
MIX = [("none", 0.0), ("snapkv", 0.5), ("defensivekv", 0.5), ("streaming_llm", 0.6), ("knorm", 0.3)]


def workload(n):
    words = CONTEXT.split()
    reqs = []
    for i in range(n):
        press, ratio = MIX[i % len(MIX)]
        # Rotate the context so every request has its own cache contents.
        cut = (7 * i) % len(words)
        context = " ".join(words[cut:] + words[:cut])
        reqs.append(dict(context=context, question=QUESTION if i % 2 else "Who is Lily?", press=press,
                         compression_ratio=ratio, max_new_tokens=48 + 9 * (i % 5), request_id=f"batch-{i}"))
    return reqs


def metric_samples(text, name):
    """{labels: value} of one metric family's samples named exactly `name`."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def wait_idle_gauges(server, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        text = server.metrics()
        in_use = metric_samples(text, "defkv_kv_cache_bytes_in_use")[""]
        running = metric_samples(text, "defkv_num_requests_running")[""]
        if in_use == 0 and running == 0:
            return
        assert time.monotonic() < deadline, f"KV bytes in use {in_use}, running {running} after the last reply"
        time.sleep(0.02)


def run_concurrently(server, pb, reqs):
    """Sends every request at once (one thread each, released together); returns the responses
    (or grpc errors) in request order."""
    results = [None] * len(reqs)
    barrier = threading.Barrier(len(reqs))

    def one(i):
        with server.channel() as ch:
            stub = pb.defkv_grpc.DefKVStub(ch)
            barrier.wait()
            try:
                results[i] = stub.Generate(pb.defkv.GenerateRequest(**reqs[i]), timeout=240)
            except grpc.RpcError as e:
                results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.fixture(scope="module")
def batch_server(start_server):
    return start_server("--log_format=json", "--max_batch=16", "--max_queue=64")


def test_batched_outputs_equal_alone(batch_server, pb):
    reqs = workload(14)
    alone = []
    with batch_server.channel() as ch:
        stub = pb.defkv_grpc.DefKVStub(ch)
        for r in reqs:
            alone.append(stub.Generate(pb.defkv.GenerateRequest(**r), timeout=120))
    before = metric_samples(batch_server.metrics(), "defkv_decode_batch_size_sum").get("", 0.0)
    steps_before = metric_samples(batch_server.metrics(), "defkv_decode_batch_size_count").get("", 0.0)

    together = run_concurrently(batch_server, pb, reqs)
    for r, a, b in zip(reqs, alone, together):
        assert not isinstance(b, grpc.RpcError), f"{r['request_id']}: {b}"
        assert list(b.token_ids) == list(a.token_ids), f"{r['request_id']} ({r['press']}) differs when batched"
        assert b.text == a.text
        assert b.finish_reason == a.finish_reason

    # The requests really shared decode steps: the mean batch of the concurrent phase is well above 1.
    text = batch_server.metrics()
    seqs = metric_samples(text, "defkv_decode_batch_size_sum")[""] - before
    steps = metric_samples(text, "defkv_decode_batch_size_count")[""] - steps_before
    assert steps > 0 and seqs / steps > 3, f"mean decode batch {seqs / max(steps, 1):.2f}: requests were not batched"
    # Everything handed back once the batch is empty (the gauges follow the last reply at once).
    wait_idle_gauges(batch_server)


def test_fine_prefill_steps_give_the_same_outputs(start_server, pb):
    # One 16-token chunk through one layer per engine step: prefills are spread over many steps
    # with decode steps of the others between them; each request still gets its lone output.
    server = start_server("--log_format=json", "--max_batch=16", "--prefill_chunk=16", "--prefill_step_tokens=1")
    reqs = workload(12)
    with server.channel() as ch:
        stub = pb.defkv_grpc.DefKVStub(ch)
        alone = [stub.Generate(pb.defkv.GenerateRequest(**r), timeout=120) for r in reqs]
    together = run_concurrently(server, pb, reqs)
    for r, a, b in zip(reqs, alone, together):
        assert not isinstance(b, grpc.RpcError), f"{r['request_id']}: {b}"
        assert list(b.token_ids) == list(a.token_ids), f"{r['request_id']} ({r['press']}) differs when batched"
    wait_idle_gauges(server)


def bytes_per_token(server, pb):
    with server.channel() as ch:
        info = pb.defkv_grpc.DefKVStub(ch).GetModelInfo(pb.defkv.GetModelInfoRequest(), timeout=10)
    elem = 2 if info.dtype in ("bfloat16", "float16") else 4
    return 2 * info.num_layers * info.num_kv_heads * info.head_dim * elem


def test_kv_budget_limits_the_batch_first_come_first_served(start_server, pb):
    probe = start_server("--log_format=json")
    per_token = bytes_per_token(probe, pb)
    probe.terminate()
    # Full-cache requests of about 100 prompt tokens + 64 new: a budget for two of them at a time.
    reqs = [dict(context=CONTEXT, question=QUESTION, press="none", max_new_tokens=64, request_id=f"budget-{i}")
            for i in range(6)]
    with probe_tokens(start_server, pb, reqs[0]) as prompt_tokens:
        peak = (prompt_tokens + 64) * per_token
    budget = int(2.2 * peak)
    server = start_server("--log_format=json", f"--kv_cache_bytes={budget}", "--max_batch=16")
    text = server.metrics()
    assert metric_samples(text, "defkv_kv_cache_budget_bytes")[""] == budget

    results = run_concurrently(server, pb, reqs)
    assert all(not isinstance(r, grpc.RpcError) for r in results), results
    text = server.metrics()
    buckets = metric_samples(text, "defkv_decode_batch_size_bucket")
    count = metric_samples(text, "defkv_decode_batch_size_count")[""]
    assert buckets['{le="2"}'] == count, "more than two full-cache requests decoded together over a 2.2x budget"
    assert buckets['{le="1"}'] < count, "the two that fit never ran together"

    # A request that could never fit gets RESOURCE_EXHAUSTED at once; the server goes on.
    huge = dict(context=" ".join([CONTEXT] * 2), question=QUESTION, press="none", max_new_tokens=200)
    with server.channel() as ch:
        stub = pb.defkv_grpc.DefKVStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.defkv.GenerateRequest(**huge), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "KV budget" in err.value.details()
        ok = stub.Generate(pb.defkv.GenerateRequest(**reqs[0]), timeout=60)
        assert ok.usage.generated_tokens > 0
    # Compression turns freed memory into concurrency: at ratio 0.75 more than two run together.
    compressed = [dict(r, press="snapkv", compression_ratio=0.75, request_id=f"c-{i}") for i, r in enumerate(reqs)]
    before = metric_samples(server.metrics(), "defkv_decode_batch_size_bucket")['{le="2"}']
    results = run_concurrently(server, pb, compressed)
    assert all(not isinstance(r, grpc.RpcError) for r in results), results
    after = metric_samples(server.metrics(), "defkv_decode_batch_size_bucket")
    total_after = metric_samples(server.metrics(), "defkv_decode_batch_size_count")[""]
    assert total_after - count > after['{le="2"}'] - before, "no step decoded more than two compressed requests"


class probe_tokens:
    """Context manager: the prompt tokens of `req` as a max_new_tokens=0 request reports them."""

    def __init__(self, start_server, pb, req):
        self.server = start_server("--log_format=json")
        self.pb, self.req = pb, req

    def __enter__(self):
        with self.server.channel() as ch:
            r = self.pb.defkv_grpc.DefKVStub(ch).Generate(
                self.pb.defkv.GenerateRequest(**dict(self.req, max_new_tokens=0)), timeout=60)
        return r.usage.context_tokens + r.usage.question_tokens

    def __exit__(self, *exc):
        self.server.terminate()


def test_cancelled_request_frees_its_memory_at_once(batch_server, pb):
    with batch_server.channel() as ch:
        stub = pb.defkv_grpc.DefKVStub(ch)
        stream = stub.GenerateStream(pb.defkv.GenerateRequest(context=CONTEXT, question=QUESTION, max_new_tokens=300,
                                                              press="snapkv", compression_ratio=0.5), timeout=120)
        got = 0
        for msg in stream:
            if msg.HasField("delta"):
                got += 1
                if got == 3:
                    in_use = metric_samples(batch_server.metrics(), "defkv_kv_cache_bytes_in_use")[""]
                    assert in_use > 0
                    stream.cancel()
                    break
    wait_idle_gauges(batch_server, timeout=10)


def test_head_of_queue_is_not_overtaken(start_server, pb):
    """First come, first served: a small request that would fit beside the running one still waits
    behind a big one at the head of the queue (no starvation of big requests)."""
    probe = start_server("--log_format=json")
    per_token = bytes_per_token(probe, pb)
    probe.terminate()
    small_ctx, big_ctx = CONTEXT, " ".join([CONTEXT] * 2)
    with probe_tokens(start_server, pb, dict(context=small_ctx, question=QUESTION)) as n_small:
        pass
    with probe_tokens(start_server, pb, dict(context=big_ctx, question=QUESTION)) as n_big:
        pass
    peak_a = (n_small + 250) * per_token   # running
    peak_b = (n_big + 40) * per_token      # big, waits at the head
    peak_c = (n_small + 8) * per_token     # small, would fit beside A
    budget = peak_a + peak_c + per_token
    assert peak_a + peak_b > budget
    server = start_server("--log_format=json", f"--kv_cache_bytes={budget}")
    with server.channel() as ch:
        stub = pb.defkv_grpc.DefKVStub(ch)
        a = stub.GenerateStream(pb.defkv.GenerateRequest(context=small_ctx, question=QUESTION, max_new_tokens=250,
                                                         request_id="A"), timeout=120)
        next(iter(a))  # A is running
        fb = stub.Generate.future(pb.defkv.GenerateRequest(context=big_ctx, question=QUESTION, max_new_tokens=40,
                                                           request_id="B"), timeout=120)
        time.sleep(0.2)
        fc = stub.Generate.future(pb.defkv.GenerateRequest(context=small_ctx, question=QUESTION, max_new_tokens=8,
                                                           request_id="C"), timeout=120)
        for _ in a:
            pass
        fb.result()
        fc.result()
    rec = {r: server.request_log(r) for r in "ABC"}
    assert all(rec[r]["code"] == "OK" for r in "ABC"), rec
    # C waited until A had finished (B took A's room first), although it fit beside A.
    order = [x["id"] for x in server.json_logs() if x.get("msg") == "request"]
    assert order.index("A") < order.index("C"), order
    assert rec["C"]["queue_s"] >= rec["B"]["queue_s"] - 0.2 - 0.05, rec


def test_engine_stats_line_reports_the_batch(start_server, pb):
    """While requests run, the engine logs "engine stats" lines: the decode steps, the batch they
    carried and where a step's time went; the tokens they count never exceed those generated."""
    server = start_server("--log_format=json", "--max_batch=16", "--stats_interval_s=0.2")
    reqs = [dict(r, max_new_tokens=120) for r in workload(6)]
    results = run_concurrently(server, pb, reqs)
    for r, res in zip(reqs, results):
        assert not isinstance(res, grpc.RpcError), f"{r['request_id']}: {res}"
    generated = sum(len(res.token_ids) for res in results)
    deadline = time.monotonic() + 5
    while True:
        lines = [j for j in server.json_logs() if j.get("msg") == "engine stats"]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert lines, f"no engine stats line:\n{server.logs()}"
    keys = {"interval_s", "iterations", "running", "waiting", "decode_steps", "max_batch", "mean_batch",
            "decode_step_ms", "step_with_prefill_ms", "steps_with_prefill", "decode_model_ms", "decode_accept_ms",
            "decode_tokens_per_s", "prefill_tokens_per_s"}
    for j in lines:
        assert keys <= j.keys(), keys - j.keys()
        assert 0 <= j["max_batch"] <= 6 and j["mean_batch"] <= j["max_batch"] + 1e-9
    assert max(j["max_batch"] for j in lines) >= 2, "the stats never saw a batch"
    busy = [j for j in lines if j["decode_steps"] > 0]
    assert busy and all(j["decode_model_ms"] > 0 and j["decode_tokens_per_s"] > 0 for j in busy)
    counted = sum(round(j["mean_batch"] * j["decode_steps"]) for j in lines)
    # Each request's first token comes from its prefill step, the EOS step adds at most one.
    assert 0 < counted <= generated, (counted, generated)
