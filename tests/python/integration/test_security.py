"""TLS, mutual TLS and bearer-token authentication against the real server: the right
credentials get answers, missing or wrong ones get UNAVAILABLE (no handshake) or
UNAUTHENTICATED, and health checks stay open."""
import subprocess

import grpc
import pytest


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made with openssl."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=defkv test CA",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=defkv {name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)
    # A second CA, to present a client certificate the server must not trust.
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=other CA",
            "-keyout", "other.key", "-out", "other.pem", cwd=d)
    return d


def read(p):
    return p.read_bytes()


def ask(pb, channel, metadata=None):
    stub = pb.defkv_grpc.DefKVStub(channel)
    return stub.Generate(pb.defkv.GenerateRequest(question="Once upon a time", use_chat_template=False,
                                                  max_new_tokens=4), timeout=30, metadata=metadata)


def test_tls(start_server, pb, pki):
    creds = grpc.ssl_channel_credentials(root_certificates=read(pki / "ca.pem"))
    s = start_server(f"--tls_cert={pki / 'server.pem'}", f"--tls_key={pki / 'server.key'}", credentials=creds)
    with s.channel() as ch:
        assert ask(pb, ch).usage.generated_tokens == 4
    with grpc.insecure_channel(s.addr) as ch, pytest.raises(grpc.RpcError) as e:
        ask(pb, ch)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "tls=on" in s.logs()


def test_mutual_tls(start_server, pb, pki):
    good = grpc.ssl_channel_credentials(read(pki / "ca.pem"), read(pki / "client.key"), read(pki / "client.pem"))
    s = start_server(f"--tls_cert={pki / 'server.pem'}", f"--tls_key={pki / 'server.key'}",
                     f"--tls_client_ca={pki / 'ca.pem'}", credentials=good)
    with s.channel() as ch:
        assert ask(pb, ch).usage.generated_tokens == 4
    assert "tls=mutual" in s.logs()
    no_cert = grpc.ssl_channel_credentials(read(pki / "ca.pem"))
    untrusted = grpc.ssl_channel_credentials(read(pki / "ca.pem"), read(pki / "other.key"), read(pki / "other.pem"))
    for creds in (no_cert, untrusted):
        with grpc.secure_channel(s.addr, creds) as ch, pytest.raises(grpc.RpcError) as e:
            ask(pb, ch)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bearer_tokens(start_server, pb, bin_dir, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# one token per line\nalpha-secret-1\n\nbeta-secret-2\n")
    s = start_server(f"--auth_token_file={tokens}")
    with s.channel() as ch:
        for md in (None, [("authorization", "Bearer wrong")], [("authorization", "Basic alpha-secret-1")],
                   [("authorization", "Bearer alpha-secret-")], [("authorization", "Bearer alpha-secret-11")]):
            with pytest.raises(grpc.RpcError) as e:
                ask(pb, ch, md)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, md
        for token in ("alpha-secret-1", "beta-secret-2"):
            assert ask(pb, ch, [("authorization", f"Bearer {token}")]).usage.generated_tokens == 4
        stub = pb.defkv_grpc.DefKVStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.ListPresses(pb.defkv.ListPressesRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.ListPresses(pb.defkv.ListPressesRequest(), timeout=10,
                                metadata=[("authorization", "Bearer beta-secret-2")]).presses
    # Health stays open for probes.
    assert s.health() == pb.health.HealthCheckResponse.SERVING
    assert "auth=\"bearer token\"" in s.logs()
    # The CLI sends its token; without one it exits with UNAUTHENTICATED's code (16).
    cli = [str(bin_dir / "defkv"), "--addr", s.addr]
    assert subprocess.run(cli + ["presses"], capture_output=True, timeout=30).returncode == 16
    ok = subprocess.run(cli + ["--token", "alpha-secret-1", "presses"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "defensivekv" in ok.stdout
    assert subprocess.run(cli + ["health"], capture_output=True, timeout=30).returncode == 0
    assert "unauthenticated" in s.logs()
    assert any(line.startswith("defkv_requests_total") and "UNAUTHENTICATED" in line.upper() and not line.endswith(" 0")
               for line in s.metrics().splitlines())


def test_cli_over_tls(start_server, pb, bin_dir, pki):
    creds = grpc.ssl_channel_credentials(read(pki / "ca.pem"), read(pki / "client.key"), read(pki / "client.pem"))
    s = start_server(f"--tls_cert={pki / 'server.pem'}", f"--tls_key={pki / 'server.key'}",
                     f"--tls_client_ca={pki / 'ca.pem'}", credentials=creds)
    cli = [str(bin_dir / "defkv"), "--addr", s.addr, "--tls_ca", str(pki / "ca.pem")]
    mtls = cli + ["--tls_cert", str(pki / "client.pem"), "--tls_key", str(pki / "client.key")]
    assert subprocess.run(mtls + ["health"], capture_output=True, timeout=30).returncode == 0
    assert subprocess.run(cli + ["health"], capture_output=True, timeout=30).returncode == 14  # no client cert


def test_bad_security_flags_exit_2(bin_dir, tmp_path, pki):
    server = str(bin_dir / "defkv-server")
    common = ["--host=127.0.0.1", "--port=0", "--metrics_port=-1"]
    for flags, expect in (([f"--tls_cert={pki / 'server.pem'}"], "--tls_cert and --tls_key go together"),
                          ([f"--tls_cert={tmp_path / 'nope.pem'}", f"--tls_key={pki / 'server.key'}"], "cannot read"),
                          ([f"--auth_token_file={tmp_path / 'none'}"], "cannot read the token file")):
        p = subprocess.run([server, *flags, *common], capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and expect in p.stdout + p.stderr, (flags, p.stdout, p.stderr)
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    p = subprocess.run([server, f"--auth_token_file={empty}", *common], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "no token" in p.stdout + p.stderr
