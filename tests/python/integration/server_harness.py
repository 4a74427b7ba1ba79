"""Helpers shared by the integration tests and the soak (soak.py): the generated stubs, free ports,
a defkv-server process, the shared server's limits and the test inputs. (Fixtures live in
conftest.py.)"""
import importlib
import json
import pathlib
import signal
import socket
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def generate_stubs(repo_root: pathlib.Path, out: pathlib.Path):
    """Compiles the protos into `out` and returns the modules: .defkv (messages), .defkv_grpc,
    .health(_grpc), .reflection(_grpc)."""
    from grpc_tools import protoc
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    # health and reflection are compiled from their own folders so their modules are top-level
    # (a generated `grpc/` package would shadow the grpc library).
    jobs = [
        (repo_root / "proto", "defkv/v1/defkv.proto"),
        (repo_root / "proto" / "grpc" / "health" / "v1", "health.proto"),
        (HERE / "protos", "reflection.proto"),
    ]
    for root, rel in jobs:
        rc = protoc.main(["protoc", f"-I{root}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", rel])
        assert rc == 0, f"protoc failed on {rel}"
    sys.path.insert(0, str(out))

    class Modules:
        defkv = importlib.import_module("defkv.v1.defkv_pb2")
        defkv_grpc = importlib.import_module("defkv.v1.defkv_pb2_grpc")
        health = importlib.import_module("health_pb2")
        health_grpc = importlib.import_module("health_pb2_grpc")
        reflection = importlib.import_module("reflection_pb2")
        reflection_grpc = importlib.import_module("reflection_pb2_grpc")

    return Modules


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The shared server's limits; tests of the error paths refer to them.
MAX_CONTEXT_TOKENS = 300
MAX_NEW_TOKENS_LIMIT = 400
MAX_RECEIVE_BYTES = 1 << 20


CONTEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friend Tom. One day, they found a big red ball under a tree. Lily wanted to kick the ball, but Tom "
    "wanted to throw it. They talked and decided to take turns. They played all day and had lots of fun. "
    "When the sun went down, they went home happy."
)
QUESTION = "What did Lily and Tom find?"


def in_process(bin_dir, model_dir, tmp_path, press="none", ratio=0.0, max_new_tokens=24):
    """The in-process Generator's answer (defkv-generate) for CONTEXT and QUESTION: (returncode, text, stderr)."""
    ctx = tmp_path / "context.txt"
    ctx.write_text(CONTEXT)
    proc = subprocess.run([str(bin_dir / "defkv-generate"), f"--model={model_dir}", f"--context-file={ctx}",
                           f"--question={QUESTION}", f"--max-new-tokens={max_new_tokens}", f"--press={press}",
                           f"--compression-ratio={ratio}", "--threads=1"], capture_output=True, text=True, timeout=120)
    text = proc.stdout[:-1] if proc.stdout.endswith("\n") else proc.stdout
    return proc.returncode, text, proc.stderr


class Server:
    """A defkv-server process. Logs go to a file (a pipe could fill up and stall the server)."""

    def __init__(self, bin_dir, model_dir, log_path, pb, *extra, credentials=None):
        self.port, self.metrics_port = free_port(), free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.pb = pb
        self.credentials = credentials  # grpc.ChannelCredentials for a TLS server, else None
        # One intra-op thread: the test machine is small and shared, and spinning OpenMP workers
        # slow a tiny model down by an order of magnitude there.
        self.cmd = [str(bin_dir / "defkv-server"), f"--model={model_dir}", "--host=127.0.0.1", f"--port={self.port}",
                    f"--metrics_port={self.metrics_port}", "--threads=1", *extra]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_serving()

    def channel(self):
        import grpc
        options = [("grpc.max_send_message_length", -1)]
        if self.credentials is not None:
            return grpc.secure_channel(self.addr, self.credentials, options=options)
        return grpc.insecure_channel(self.addr, options=options)

    def health(self, service: str = "") -> int:
        with self.channel() as ch:
            stub = self.pb.health_grpc.HealthStub(ch)
            return stub.Check(self.pb.health.HealthCheckRequest(service=service), timeout=2).status

    def wait_serving(self, timeout=30.0):
        import grpc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"defkv-server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if self.health() == self.pb.health.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"defkv-server not SERVING after {timeout}s:\n{self.logs()}")

    def stub(self):
        return self.pb.defkv_grpc.DefKVStub(self.channel())

    def logs(self) -> str:
        self.log.flush()
        return pathlib.Path(self.log_path).read_text()

    def json_logs(self) -> list[dict]:
        return [json.loads(line) for line in self.logs().splitlines() if line.startswith("{")]

    def request_log(self, request_id: str, timeout=5.0) -> dict:
        """The log line of a finished request (it is written just before the RPC's status goes out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in self.json_logs():
                if rec.get("msg") == "request" and rec.get("id") == request_id:
                    return rec
            time.sleep(0.02)
        raise AssertionError(f"no log line for request {request_id}:\n{self.logs()}")

    def metrics(self) -> str:
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def terminate(self, timeout=30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
