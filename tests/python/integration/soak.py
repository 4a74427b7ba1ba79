"""Soak: a bounded run of mixed traffic against a real defkv-server on 127.0.0.1, then checks that
nothing was lost, counted twice or kept. Run by scripts/soak (minutes) and test_soak.py (seconds).

Several client threads send, at random: valid Generate and GenerateStream calls over every press
the model can take, streams the client cancels after their first delta, calls with deadlines
shorter than generation, and invalid requests (unknown press, ratio out of range or NaN, huge or
negative max_new_tokens, bad press options, blank question, bad sampling values, a prompt over
--max_context_tokens, a wrong or missing bearer token, bytes that do not parse, a bad request id).
Every outcome is recorded. Afterwards:

  1. each call ended exactly once, with a code its kind allows; a stream sent its final message
     only on success, last, and its deltas add up to it;
  2. the server logged exactly one request line per id it received (none for ids it never saw),
     with the client's code, or, for a cancel or deadline that raced the end of generation, a
     code that race allows;
  3. defkv_requests_total grew, code by code, by exactly the requests the server logged, and
     defkv_generation_tokens_total / defkv_prompt_tokens_total by the tokens of the OK ones;
  4. once idle, no request is running or waiting, the KV gauge (when the server has one) is back
     to its idle value, and the resident set size is back within tolerance of its idle level
     (not comparable under ASan/TSan, whose allocators keep freed memory: LeakSanitizer checks
     leaks there);
  5. the server is still SERVING, and exits 0 on SIGTERM.

    python tests/python/integration/soak.py --minutes 3 [--clients 6] [--build-dir build]
"""
import argparse
import collections
import concurrent.futures
import json
import math
import os
import pathlib
import random
import sys
import tempfile
import threading
import time

import grpc

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE))
from server_harness import CONTEXT, Server, generate_stubs  # noqa: E402

MAX_CONTEXT_TOKENS = 300
MAX_NEW_TOKENS_LIMIT = 64
# Calls a client abandoned (deadline, cancel) wait in the queue until the engine reaches them, so
# the queue fills now and then: full-queue refusals are part of the mix.
MAX_QUEUE = 8
TOKEN = "soak-token-7f3a"
# RSS may end above its idle level by this much: glibc keeps freed memory in per-thread arenas and
# gRPC grows its thread pool under load, neither of which is returned. A per-request leak of L bytes
# over N requests adds N*L, so a few thousand requests show leaks of a few KiB per request.
RSS_TOLERANCE_MIB = 24
RSS_TOLERANCE_FRACTION = 0.05

# Codes a client may see, and codes the server may log for it, by kind of call.
RACES = {
    # cancelled after the first delta: the server may have finished before it saw the cancel
    "CANCELLED": {"CANCELLED", "OK"},
    # the deadline may pass on the client before, during or after the server's answer (a refusal
    # from a full queue included)
    "DEADLINE_EXCEEDED": {"DEADLINE_EXCEEDED", "CANCELLED", "OK", "RESOURCE_EXHAUSTED"},
}


class Record:
    """One call as the client saw it."""

    def __init__(self, kind, rpc, rid, matchable, allowed):
        self.kind, self.rpc, self.id, self.matchable, self.allowed = kind, rpc, rid, matchable, allowed
        self.code = None           # the final status, exactly once
        self.finals = 0            # stream: final messages received
        self.problems = []         # what the client saw that breaks an invariant
        self.generated = None      # usage.generated_tokens of an OK answer
        self.server_may_miss = False  # a deadline can expire before the server sees the call

    def finish(self, code):
        if self.code is not None:
            self.problems.append(f"second final status {code} after {self.code}")
        self.code = code


class Soak:
    def __init__(self, pb, server, seed, clients):
        self.pb, self.server, self.clients = pb, server, clients
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.records = []
        self.presses = []      # presses that answered OK at warm-up: the valid mix
        self.skipped = {}      # press -> code, for presses this model's context cannot take
        self.channel = server.channel()
        self.stub = pb.defkv_grpc.DefKVStub(self.channel)
        self.auth = [("authorization", f"Bearer {TOKEN}")]
        self.raw_generate = self.channel.unary_unary("/defkv.v1.DefKV/Generate")  # bytes in, bytes out

    # ---- requests -------------------------------------------------------------------------------
    def valid_request(self, rng, rid, max_new=None):
        words = CONTEXT.split()
        press = rng.choice(self.presses)
        return self.pb.defkv.GenerateRequest(
            context=" ".join(words[: rng.randint(len(words) // 2, len(words))]), question="What did they find?",
            press=press, compression_ratio=0.0 if press == "none" else rng.choice([0.1, 0.3, 0.5, 0.7, 0.9]),
            max_new_tokens=max_new if max_new is not None else rng.randint(1, 24),
            temperature=rng.choice([0.0, 0.0, 0.8]), seed=rng.randint(0, 1000),
            use_chat_template=rng.random() < 0.5, request_id=rid)

    def invalid_request(self, rng, rid):
        """(kind, request or raw bytes, expected code, metadata, id usable to match the server log)"""
        req = self.valid_request(rng, rid)
        kind = rng.choice(["unknown_press", "ratio", "max_new_tokens", "press_option", "blank_question",
                           "sampling", "prompt_too_long", "wrong_token", "no_token", "not_utf8", "bad_id"])
        code, metadata, matchable = "INVALID_ARGUMENT", self.auth, True
        if kind == "unknown_press":
            req.press = "no-such-press"
        elif kind == "ratio":
            req.press, req.compression_ratio = "knorm", rng.choice([1.0, 1.5, -0.1, math.nan, math.inf])
        elif kind == "max_new_tokens":
            req.max_new_tokens = rng.choice([MAX_NEW_TOKENS_LIMIT + 1, 2**31 - 1, -1])
        elif kind == "press_option":
            req.press, req.compression_ratio = "snapkv", 0.5
            req.press_options[rng.choice(["window_size", "no_such_option"])] = "not-a-number"
        elif kind == "blank_question":
            req.question = rng.choice(["", "   ", "\t\n"])
        elif kind == "sampling":
            rng.choice([lambda: setattr(req, "temperature", -1.0), lambda: setattr(req, "top_p", 1.5),
                        lambda: setattr(req, "top_k", -2), lambda: req.stop.append("")])()
        elif kind == "prompt_too_long":
            req.context, code = " ".join([CONTEXT] * 6), "OUT_OF_RANGE"
        elif kind == "wrong_token":
            code, metadata, matchable = "UNAUTHENTICATED", [("authorization", "Bearer wrong")], False
        elif kind == "no_token":
            code, metadata, matchable = "UNAUTHENTICATED", None, False
        elif kind == "not_utf8":
            # field 2 (question), length 3, bytes that are not UTF-8: grpc++ cannot parse it
            return kind, b"\x12\x03\xff\xfe\x41", code, self.auth, False
        elif kind == "bad_id":
            req.request_id, matchable = f"{rid} has spaces", False
        return kind, req, code, metadata, matchable

    # ---- calls ----------------------------------------------------------------------------------
    def unary(self, rec, req, metadata, timeout=60):
        try:
            resp = self.stub.Generate(req, timeout=timeout, metadata=metadata)
            rec.generated = resp.usage.generated_tokens
            rec.finish("OK")
        except grpc.RpcError as e:
            rec.finish(e.code().name)

    def stream(self, rec, req, metadata, cancel_after_first=False):
        call = self.stub.GenerateStream(req, timeout=60, metadata=metadata)
        text, ids, final = "", [], None
        try:
            for msg in call:
                if final is not None:
                    rec.problems.append("a message after the final one")
                if msg.HasField("final"):
                    final = msg.final
                    rec.finals += 1
                else:
                    text += msg.delta.text
                    ids.extend(msg.delta.token_ids)
                if cancel_after_first:
                    call.cancel()
                    break
        except grpc.RpcError:
            pass
        rec.finish(call.code().name)
        if final is not None:
            if rec.code != "OK" and not cancel_after_first:
                rec.problems.append(f"a final message on a stream that ended {rec.code}")
            if final.text != text or list(final.token_ids) != ids:
                rec.problems.append("the deltas do not add up to the final message")
            rec.generated = final.usage.generated_tokens
        elif rec.code == "OK" and not cancel_after_first:
            rec.problems.append("a stream ended OK without its final message")

    def one_call(self, rng, rid):
        r = rng.random()
        if r < 0.35:  # valid, unary or stream, read to the end
            rpc = rng.choice(["Generate", "GenerateStream"])
            rec = Record("valid", rpc, rid, True, {"OK", "RESOURCE_EXHAUSTED"})
            req = self.valid_request(rng, rid)
            self.unary(rec, req, self.auth) if rpc == "Generate" else self.stream(rec, req, self.auth)
        elif r < 0.50:  # the client cancels after the first delta
            rec = Record("cancel", "GenerateStream", rid, True, {"CANCELLED", "OK", "RESOURCE_EXHAUSTED"})
            self.stream(rec, self.valid_request(rng, rid, max_new=MAX_NEW_TOKENS_LIMIT), self.auth, True)
        elif r < 0.60:  # a deadline shorter than the generation
            rec = Record("deadline", "Generate", rid, True, {"DEADLINE_EXCEEDED", "OK", "RESOURCE_EXHAUSTED"})
            rec.server_may_miss = True
            self.unary(rec, self.valid_request(rng, rid, max_new=MAX_NEW_TOKENS_LIMIT), self.auth,
                       timeout=rng.uniform(0.005, 0.3))
        else:
            kind, req, code, metadata, matchable = self.invalid_request(rng, rid)
            rpc = "Generate" if isinstance(req, bytes) else rng.choice(["Generate", "GenerateStream"])
            # The prompt's length and the press options are checked by the engine, after admission:
            # a full queue refuses them first.
            allowed = {code, "RESOURCE_EXHAUSTED"} if kind in ("prompt_too_long", "press_option") else {code}
            rec = Record(kind, rpc, rid if matchable else None, matchable, allowed)
            if isinstance(req, bytes):
                try:
                    self.raw_generate(req, timeout=60, metadata=metadata)
                    rec.finish("OK")
                except grpc.RpcError as e:
                    rec.finish(e.code().name)
            elif rpc == "Generate":
                self.unary(rec, req, metadata)
            else:
                self.stream(rec, req, metadata)
        if rec.code not in rec.allowed:
            rec.problems.append(f"code {rec.code}, expected one of {sorted(rec.allowed)}")
        return rec

    def client(self, index, prefix, until):
        rng = random.Random(self.rng.random() + index)
        n = 0
        while time.monotonic() < until:
            rec = self.one_call(rng, f"{prefix}-{index}-{n}")
            n += 1
            with self.lock:
                self.records.append(rec)

    def run_clients(self, prefix, seconds):
        until = time.monotonic() + seconds
        with concurrent.futures.ThreadPoolExecutor(self.clients) as pool:
            for f in [pool.submit(self.client, i, prefix, until) for i in range(self.clients)]:
                f.result()

    def choose_presses(self):
        presses = self.stub.ListPresses(self.pb.defkv.ListPressesRequest(), timeout=30, metadata=self.auth)
        for p in presses.presses:
            req = self.pb.defkv.GenerateRequest(context=CONTEXT, question="What did they find?", press=p.name,
                                                compression_ratio=0.0 if p.name == "none" else 0.5,
                                                max_new_tokens=2, request_id=f"warmup-press-{p.name}")
            try:
                self.stub.Generate(req, timeout=120, metadata=self.auth)
                self.presses.append(p.name)
            except grpc.RpcError as e:
                self.skipped[p.name] = e.code().name


# ---- the server's side ---------------------------------------------------------------------------
def scrape(server):
    """{(name, labels): value} of every sample on /metrics."""
    out = {}
    for line in server.metrics().splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        name, _, labels = key.partition("{")
        out[(name, labels.rstrip("}"))] = float(value)
    return out


def by_code(samples, name="defkv_requests_total"):
    counts = collections.Counter()
    for (n, labels), v in samples.items():
        if n == name:
            code = dict(kv.split("=", 1) for kv in labels.split(",") if kv)["code"].strip('"')
            counts[code] += v
    return counts


def total(samples, name):
    return sum(v for (n, _), v in samples.items() if n == name)


def rss_bytes(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def wait_idle(server, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = scrape(server)
        if total(s, "defkv_num_requests_running") == 0 and total(s, "defkv_num_requests_waiting") == 0:
            return s
        time.sleep(0.2)
    return scrape(server)


def sanitized(binary: pathlib.Path) -> bool:
    data = binary.read_bytes()
    return b"__asan_init" in data or b"__tsan_init" in data


# ---- the run -------------------------------------------------------------------------------------
def run(bin_dir, model_dir, seconds, clients=6, seed=1, workdir=None):
    """Starts a server, soaks it for `seconds`, checks. Returns (report text, list of failures)."""
    workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="defkv-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pb = generate_stubs(REPO, workdir)
    (workdir / "tokens.txt").write_text(f"# soak\n{TOKEN}\n")
    started = time.monotonic()
    server = Server(bin_dir, model_dir, workdir / "server.log", pb, "--log_format=json", f"--max_queue={MAX_QUEUE}",
                    f"--max_context_tokens={MAX_CONTEXT_TOKENS}", f"--max_new_tokens_limit={MAX_NEW_TOKENS_LIMIT}",
                    f"--auth_token_file={workdir / 'tokens.txt'}")
    failures = []
    try:
        soak = Soak(pb, server, seed, clients)
        soak.choose_presses()
        if not soak.presses:
            raise AssertionError(f"no press answered OK at warm-up: {soak.skipped}")
        # Warm-up: the same mix for a while, so thread pools, arenas and caches reach their working size.
        warmup = min(10.0, max(2.0, seconds / 10))
        soak.run_clients("warmup", warmup)
        soak.records.clear()
        idle = wait_idle(server)
        time.sleep(1.0)
        rss_idle = rss_bytes(server.proc.pid)
        idle = scrape(server)
        log_lines_before = len(server.json_logs())

        t0 = time.monotonic()
        peak = [rss_idle]
        stop_sampling = threading.Event()

        def sample():
            while not stop_sampling.wait(0.5):
                peak[0] = max(peak[0], rss_bytes(server.proc.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        soak.run_clients("soak", seconds)
        stop_sampling.set()
        sampler.join()
        soak_seconds = time.monotonic() - t0

        end = wait_idle(server)
        time.sleep(1.0)
        rss_end = rss_bytes(server.proc.pid)
        end = scrape(server)
        serving = server.health() == pb.health.HealthCheckResponse.SERVING
        lines = [r for r in server.json_logs()[log_lines_before:] if r.get("msg") == "request"]
        records = soak.records

        # 1. the client's view
        for rec in records:
            for p in rec.problems:
                failures.append(f"{rec.id or rec.kind} ({rec.kind}, {rec.rpc}): {p}")
            if rec.code is None:
                failures.append(f"{rec.id or rec.kind}: no final status")

        # 2. one server log line per id, with a code consistent with the client's
        logged = collections.defaultdict(list)
        unmatched_lines = collections.Counter()
        for line in lines:
            if str(line.get("id", "")).startswith("soak-") and " " not in str(line.get("id", "")):
                logged[line["id"]].append(line)
            else:
                unmatched_lines[line.get("code")] += 1
        ids = {rec.id for rec in records if rec.matchable}
        for rid in set(logged) - ids:
            failures.append(f"the server logged {rid}, which no client sent")
        expected_counts = collections.Counter()
        races = collections.Counter()
        unseen = 0
        for rec in records:
            if not rec.matchable:
                expected_counts[rec.code] += 1
                continue
            seen = logged.get(rec.id, [])
            if len(seen) > 1:
                failures.append(f"{rec.id}: {len(seen)} server log lines")
            if not seen:
                if rec.server_may_miss and rec.code == "DEADLINE_EXCEEDED":
                    unseen += 1
                else:
                    failures.append(f"{rec.id} ({rec.kind}, client {rec.code}): no server log line")
                continue
            server_code = seen[0]["code"]
            expected_counts[server_code] += 1
            if server_code != rec.code:
                if server_code in RACES.get(rec.code, set()):
                    races[f"client {rec.code} / server {server_code}"] += 1
                else:
                    failures.append(f"{rec.id} ({rec.kind}): client saw {rec.code}, server logged {server_code}")
            elif rec.code == "OK" and rec.generated is not None and seen[0].get("generated_tokens") != rec.generated:
                failures.append(f"{rec.id}: client got {rec.generated} tokens, server logged "
                                f"{seen[0].get('generated_tokens')}")
        client_unmatched = collections.Counter(rec.code for rec in records if not rec.matchable)
        if unmatched_lines != client_unmatched:
            failures.append(f"calls without a usable id: server logged {dict(unmatched_lines)}, "
                            f"clients saw {dict(client_unmatched)}")

        # 3. the counters
        counted = by_code(end) - by_code(idle)
        counter_rows = []
        for code in sorted(set(counted) | set(expected_counts)):
            client_count = sum(1 for rec in records if rec.code == code)
            counter_rows.append((code, client_count, expected_counts[code], int(counted[code])))
            if counted[code] != expected_counts[code]:
                failures.append(f"defkv_requests_total{{code=\"{code}\"}} grew by {int(counted[code])}, "
                                f"the server answered {expected_counts[code]}")
        ok_lines = [line for line in lines if line.get("code") == "OK"]
        for name, want in [("defkv_generation_tokens_total", sum(line["generated_tokens"] for line in ok_lines)),
                           ("defkv_prompt_tokens_total",
                            sum(line["context_tokens"] + line["question_tokens"] for line in ok_lines))]:
            grew = total(end, name) - total(idle, name)
            if grew != want:
                failures.append(f"{name} grew by {grew:g}, the OK requests' log lines add up to {want}")

        # 4. back to idle
        for gauge in ("defkv_num_requests_running", "defkv_num_requests_waiting"):
            if total(end, gauge) != 0:
                failures.append(f"{gauge} is {total(end, gauge):g} once idle")
        kv = [k for k in end if k[0] == "defkv_kv_cache_bytes_in_use"]
        kv_line = "absent"
        if kv:
            kv_idle, kv_end = total(idle, "defkv_kv_cache_bytes_in_use"), total(end, "defkv_kv_cache_bytes_in_use")
            kv_line = f"{kv_idle:g} idle, {kv_end:g} after"
            if kv_end != kv_idle:
                failures.append(f"defkv_kv_cache_bytes_in_use is {kv_end:g} once idle, {kv_idle:g} before")
        tolerance = max(RSS_TOLERANCE_MIB << 20, int(RSS_TOLERANCE_FRACTION * rss_idle))
        rss_checked = not sanitized(bin_dir / "defkv-server")
        if rss_checked and rss_end - rss_idle > tolerance:
            failures.append(f"RSS {rss_end >> 20} MiB once idle, {rss_idle >> 20} MiB before "
                            f"(tolerance {tolerance >> 20} MiB)")

        # 5. alive, and a clean exit
        if not serving:
            failures.append("the server is not SERVING after the soak")
        rc = server.terminate()
        if rc != 0:
            failures.append(f"defkv-server exited {rc} on SIGTERM")

        mib = lambda b: f"{b / (1 << 20):.1f} MiB"  # noqa: E731
        kinds = collections.Counter(rec.kind for rec in records)
        codes = collections.Counter(rec.code for rec in records)
        report = [
            f"soak: {len(records)} calls in {soak_seconds:.0f} s from {clients} clients "
            f"({len(records) / soak_seconds:.1f}/s), seed {seed}, server {bin_dir / 'defkv-server'}",
            f"presses used: {', '.join(soak.presses)}"
            + (f"; not used ({', '.join(f'{k}: {v}' for k, v in sorted(soak.skipped.items()))})" if soak.skipped else ""),
            "calls by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
            "client codes: " + ", ".join(f"{k} {v}" for k, v in sorted(codes.items())),
            f"races (client cancelled or timed out as the server finished): "
            + (", ".join(f"{k} {v}" for k, v in sorted(races.items())) or "none")
            + f"; deadlines that expired before the server saw the call: {unseen}",
            "defkv_requests_total by code (client saw / server logged / counter grew):",
            *[f"  {code:<20} {c:>6} {s:>6} {m:>6}" for code, c, s, m in counter_rows],
            f"tokens: generated {total(end, 'defkv_generation_tokens_total') - total(idle, 'defkv_generation_tokens_total'):g}, "
            f"prompt {total(end, 'defkv_prompt_tokens_total') - total(idle, 'defkv_prompt_tokens_total'):g} "
            f"(counters equal the OK log lines' sums: {'yes' if not any('tokens_total' in f for f in failures) else 'NO'})",
            f"memory: RSS idle {mib(rss_idle)}, peak {mib(peak[0])}, after {mib(rss_end)} "
            f"(growth {mib(rss_end - rss_idle)}, tolerance {mib(tolerance)}"
            + ("" if rss_checked else "; not checked: sanitizer build") + f"); KV gauge: {kv_line}",
            f"server: {'SERVING' if serving else 'NOT SERVING'} after the soak, exit code {rc} on SIGTERM; "
            f"total run {time.monotonic() - started:.0f} s",
            f"result: {'PASS' if not failures else f'FAIL ({len(failures)} problems)'}",
        ]
        return "\n".join(report), failures
    finally:
        server.terminate()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="length of the soak (default 3)")
    ap.add_argument("--seconds", type=float, help="length in seconds (overrides --minutes)")
    ap.add_argument("--clients", type=int, default=6, help="concurrent client threads (default 6)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--build-dir", default=os.environ.get("DEFKV_BUILD_DIR", REPO / "build"))
    ap.add_argument("--model", default=REPO / "models" / "stories260K")
    ap.add_argument("--workdir", help="where the stubs, token file and server log go (default: a temp dir)")
    args = ap.parse_args()
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    report, failures = run(pathlib.Path(args.build_dir) / "bin", pathlib.Path(args.model), seconds, args.clients,
                           args.seed, args.workdir)
    print(report)
    for f in failures[:50]:
        print("  FAILED:", f)
    if len(failures) > 50:
        print(f"  ... and {len(failures) - 50} more")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
