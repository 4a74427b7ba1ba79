"""Fixtures for the integration tests: Python stubs generated from the proto at test time, and
real defkv-server processes on 127.0.0.1 (free ports, the stories260K model)."""
import pathlib
import subprocess

import pytest

from server_harness import MAX_CONTEXT_TOKENS, MAX_NEW_TOKENS_LIMIT, MAX_RECEIVE_BYTES, Server, generate_stubs


@pytest.fixture(scope="session")
def pb(repo_root, tmp_path_factory):
    """The generated modules: pb.defkv (messages), pb.defkv_grpc, pb.health(_grpc), pb.reflection(_grpc)."""
    return generate_stubs(repo_root, tmp_path_factory.mktemp("pb"))


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
