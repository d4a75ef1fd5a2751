"""`cpm4 serve` over HTTPS (vLLM's --ssl-keyfile / --ssl-certfile) and behind a path-prefix proxy (--root-path),
as a real process on loopback with a self-signed certificate made by openssl."""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return d / "key.pem", d / "cert.pem"


def test_https_and_root_path(tiny_checkpoint, cert):
    """The server answers over TLS only (a plain HTTP request gets no HTTP answer), the openai client works with
    the certificate, the log says https, and with --root-path the API sits at the proxy's stripped paths with the
    prefix in its OpenAPI servers."""
    key, crt = cert
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cpm4.cli", "serve", str(tiny_checkpoint), "--device", "cpu",
                             "--port", str(port), "--ssl-keyfile", str(key), "--ssl-certfile", str(crt),
                             "--root-path", "/api", "--disable-log-stats"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "CPM4_API_KEY": ""})
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health", verify=str(crt), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        with httpx.Client(verify=str(crt)) as http:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", http_client=http, max_retries=0)
            out = client.completions.create(model=tiny_checkpoint.name, prompt="Hi", max_tokens=3, temperature=0)
            assert out.usage.completion_tokens >= 1
            assert http.get(f"{url}/openapi.json").json()["servers"] == [{"url": "/api"}]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert f"Uvicorn running on https://127.0.0.1:{port}" in log


def test_tls_options_are_checked_before_the_model_loads(tmp_path, cert, capsys):
    from cpm4.cli import main

    key, crt = cert
    missing = tmp_path / "no-model"  # never reached: the options fail first
    assert main(["serve", str(missing), "--ssl-keyfile", str(key), "--port", str(_free_port())]) == 2
    assert "needs both ssl_keyfile and ssl_certfile" in capsys.readouterr().err
    assert main(["serve", str(missing), "--ssl-keyfile", str(key), "--ssl-certfile", str(tmp_path / "x.pem"),
                 "--port", str(_free_port())]) == 2
    assert "ssl_certfile: no file" in capsys.readouterr().err
