"""Fixtures for the integration tests: Python stubs generated from the proto at test time, and
real defkv-server processes on 127.0.0.1 (free ports, the stories260K model)."""
import pathlib
import subprocess
import sys

import pytest

from server_harness import MAX_CONTEXT_TOKENS, MAX_NEW_TOKENS_LIMIT, MAX_RECEIVE_BYTES, Server

HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def pb(repo_root, tmp_path_factory):
    """The generated modules: pb.defkv (messages), pb.defkv_grpc, pb.health(_grpc), pb.reflection(_grpc)."""
    from grpc_tools import protoc
    import grpc_tools

    out = tmp_path_factory.mktemp("pb")
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
    import importlib

    class Modules:
        defkv = importlib.import_module("defkv.v1.defkv_pb2")
        defkv_grpc = importlib.import_module("defkv.v1.defkv_pb2_grpc")
        health = importlib.import_module("health_pb2")
        health_grpc = importlib.import_module("health_pb2_grpc")
        reflection = importlib.import_module("reflection_pb2")
        reflection_grpc = importlib.import_module("reflection_pb2_grpc")

    return Modules


@pytest.fixture(scope="session")
def model_dir(repo_root) -> pathlib.Path:
    return repo_root / "models" / "stories260K"


@pytest.fixture(scope="session")
def start_server(bin_dir, model_dir, pb, tmp_path_factory):
    """Starts a server with extra flags; every server is stopped at the end of the session."""
    for exe in ("defkv-server", "defkv", "defkv-generate"):
        if not (bin_dir / exe).is_file():
            pytest.fail(f"{bin_dir / exe} is missing: build it first (scripts/test does)")
    servers = []

    def start(*extra, credentials=None) -> Server:
        log = tmp_path_factory.mktemp("server") / "server.log"
        s = Server(bin_dir, model_dir, log, pb, *extra, credentials=credentials)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.terminate()


@pytest.fixture(scope="session")
def server(start_server) -> Server:
    return start_server("--log_format=json", "--max_queue=32", f"--max_context_tokens={MAX_CONTEXT_TOKENS}",
                        f"--max_new_tokens_limit={MAX_NEW_TOKENS_LIMIT}",
                        f"--max_receive_message_bytes={MAX_RECEIVE_BYTES}")


@pytest.fixture(scope="session")
def cli(bin_dir, server):
    """Runs the defkv CLI against the shared server."""
    def run(*args, input=None, addr=None, timeout=60):
        return subprocess.run([str(bin_dir / "defkv"), f"--addr={addr or server.addr}", *args], input=input,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)
    return run
