"""The JupyterLab check: the pure judge on hand-made probes, the probe against small fake HTTP servers,
and the whole check against real ``jupyter lab`` processes (one password-protected, one with no auth)."""

from __future__ import annotations

import http.cookiejar
import http.server
import importlib.metadata
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from checks.jupyter import Answer, JupyterProbe, judge_jupyter, jupyter_url, probe_jupyter
from checks.jupyter import jupyter_server as jupyter_server_check
from checks.node import Node
from checks.registry import Context
from checks.result import Status
from checks.stack import load_stack

URL = "http://127.0.0.1:9999/"
PASSWORD = "peftnode-test-password"
START_TIMEOUT_S = 60.0

needs_jupyterlab = pytest.mark.skipif(
    importlib.util.find_spec("jupyterlab") is None or importlib.util.find_spec("jupyter_server") is None,
    reason="jupyterlab is not installed in this environment; the real-server tests need it",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cu117() -> tuple[dict, dict]:
    stack = load_stack("cu117")
    return stack.data, stack.expectations()


def _probe(api=Answer(200), contents=Answer(403), sessions=Answer(403), version="2.21.1", body=None):
    return JupyterProbe(URL, api=api, contents=contents, sessions=sessions, version=version, api_body=body)


# --- jupyter_url ------------------------------------------------------------------------------------


def test_url_from_the_cu117_stack():
    stack, node = _cu117()
    assert jupyter_url(stack, Node.from_dict({**node, "jupyter_url": None})) == "http://127.0.0.1:9999/"


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"enabled": True, "port": 8888}, "http://127.0.0.1:8888/"),
        ({"enabled": True, "port": 8888, "bind": "0.0.0.0"}, "http://127.0.0.1:8888/"),
        ({"enabled": True, "port": 8888, "bind": "10.0.0.5"}, "http://10.0.0.5:8888/"),
        ({"enabled": True, "port": 8888, "bind": "::1"}, "http://[::1]:8888/"),
        ({"enabled": True, "port": 8888, "base_url": "/lab-base"}, "http://127.0.0.1:8888/lab-base/"),
        ({"enabled": True, "port": 8888, "base_url": "/jl/"}, "http://127.0.0.1:8888/jl/"),
        ({"enabled": False, "port": 8888}, None),
    ],
)
def test_url_from_section(section, expected):
    assert jupyter_url({"jupyterlab": section}, Node()) == expected


def test_node_override_wins_unless_disabled():
    override = Node(jupyter_url="https://node7.example:443/jl/")
    assert jupyter_url({"jupyterlab": {"enabled": True, "port": 1}}, override) == "https://node7.example:443/jl/"
    assert jupyter_url({"jupyterlab": {"enabled": False, "port": 1}}, override) is None


# --- judge: one test per branch ---------------------------------------------------------------------


def test_judge_pass_when_both_calls_refused_with_403():
    v = judge_jupyter(_probe(), URL)
    assert v.status is Status.PASS
    assert v.message == f"JupyterLab 2.21.1 answers at {URL} and refuses unauthenticated API calls"
    assert v.measured["server_version"].value == "2.21.1"
    assert v.measured["GET /api/contents"].value == "403"
    assert "401/403" in v.expected["GET /api/contents"].value
    assert v.remediation is None


def test_judge_pass_on_401_and_redirect_to_login():
    probe = _probe(contents=Answer(302, location="/login?next=%2Fapi%2Fcontents"), sessions=Answer(401))
    assert probe.login_redirect
    v = judge_jupyter(probe, URL)
    assert v.status is Status.PASS
    assert v.measured["GET /api/contents"].value == "302 to /login?next=%2Fapi%2Fcontents"


def test_judge_fail_unreachable():
    probe = JupyterProbe(URL, api=Answer(error="connection refused (nothing listens on that port)"))
    assert not probe.reachable
    v = judge_jupyter(probe, URL)
    assert v.status is Status.FAIL
    assert v.message == f"JupyterLab not reachable at {URL}: connection refused (nothing listens on that port)"
    assert "systemctl status jupyterlab" in v.remediation
    assert "9999" in v.remediation


@pytest.mark.parametrize("which", ["contents", "sessions", "both"])
def test_judge_fail_accepts_unauthenticated(which):
    contents = Answer(200) if which in ("contents", "both") else Answer(403)
    sessions = Answer(200) if which in ("sessions", "both") else Answer(403)
    v = judge_jupyter(_probe(contents=contents, sessions=sessions), URL)
    assert v.status is Status.FAIL
    assert "accepts unauthenticated API calls" in v.message
    if which != "sessions":
        assert "GET /api/contents answered 200" in v.message
    if which != "contents":
        assert "GET /api/sessions answered 200" in v.message
    assert "hashed_password" in v.remediation and "ansible-vault" in v.remediation
    assert "token=''" in v.remediation


@pytest.mark.parametrize(
    ("api", "body"),
    [(Answer(404), "<html>Not Found</html>"), (Answer(200), "hello"), (Answer(302, location="/elsewhere"), None)],
)
def test_judge_fail_not_jupyter(api, body):
    v = judge_jupyter(_probe(api=api, version=None, body=body, contents=Answer(200)), URL)
    assert v.status is Status.FAIL
    assert "does not look like Jupyter" in v.message
    assert "9999" in v.remediation


@pytest.mark.parametrize(
    "contents",
    [Answer(404), Answer(500), Answer(302, location="/somewhere"), Answer(error="connection reset by the server")],
)
def test_judge_fail_when_refusal_is_unclear(contents):
    v = judge_jupyter(_probe(contents=contents), URL)
    assert v.status is Status.FAIL
    assert "did not clearly refuse" in v.message and "GET /api/contents" in v.message


def test_registered_check_skips_when_disabled():
    stack, node = _cu117()
    stack = {**stack, "jupyterlab": {**stack["jupyterlab"], "enabled": False}}
    v = jupyter_server_check(Context(stack, node))
    assert v.status is Status.SKIP
    assert "disabled" in v.message


def test_check_is_registered():
    from checks.registry import all_checks

    spec = next(s for s in all_checks() if s.name == "jupyter.server")
    assert spec.target == "checks.jupyter:jupyter_server" and spec.group == "jupyter"


# --- probe against small fake servers (behaviours real jupyter_server 2.x does not show) ------------


class _Fake(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict, bytes]] = {}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        status, headers, body = self.routes.get(self.path, (404, {}, b"not found"))
        self.send_response(status)
        for key, val in headers.items():
            self.send_header(key, val)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    servers = []

    def start(routes: dict) -> str:
        handler = type("Handler", (_Fake,), {"routes": routes})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_probe_does_not_follow_redirect_to_login(fake_server):
    login = {"Location": "/login?next=%2Fapi%2Fcontents"}
    url = fake_server({
        "/api": (200, {"Content-Type": "application/json"}, b'{"version": "1.24.0"}'),
        "/api/contents": (302, login, b""),
        "/api/sessions": (302, {"Location": "/login"}, b""),
        "/login?next=%2Fapi%2Fcontents": (200, {}, b"login page"),  # would be 200 if the redirect were followed
    })
    probe = probe_jupyter(url, timeout_s=5)
    assert probe.version == "1.24.0"
    assert probe.contents.status == 302 and probe.contents.to_login and probe.login_redirect
    v = judge_jupyter(probe, url)
    assert v.status is Status.PASS, v.message


def test_probe_records_something_else_on_the_port(fake_server):
    url = fake_server({"/api": (200, {"Content-Type": "text/html"}, b"<html>grafana</html>")})
    probe = probe_jupyter(url[:-1], timeout_s=5)  # no trailing slash: the probe adds it
    assert probe.url == url and probe.reachable and probe.version is None
    assert probe.api_body == "<html>grafana</html>"
    v = judge_jupyter(probe, url)
    assert v.status is Status.FAIL and "does not look like Jupyter" in v.message


def test_probe_times_out_on_a_silent_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # accepts the TCP handshake, never answers HTTP
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        started = time.monotonic()
        probe = probe_jupyter(url, timeout_s=0.5)
        assert time.monotonic() - started < 5
    assert probe.error == "timed out after 0.5 s"
    assert judge_jupyter(probe, url).message == f"JupyterLab not reachable at {url}: timed out after 0.5 s"


def test_probe_bad_scheme_and_bad_host():
    assert "unsupported URL scheme" in probe_jupyter("file:///etc/").error
    assert probe_jupyter("http://nosuchhost.invalid:1/", timeout_s=2).error is not None


# --- real jupyter lab servers -----------------------------------------------------------------------


@dataclass
class LabServer:
    url: str
    proc: subprocess.Popen
    log: Path
    started_in_s: float


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server we started (its own process group, so kernels it may have spawned go too)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + "api", timeout=2) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def _start_lab(workdir: Path, auth_args: list[str]) -> LabServer:
    """Start ``jupyter lab`` on a free loopback port with an isolated home and config; wait until /api
    answers. Retries on a port lost to a race; kills the process if it never becomes ready."""
    root = workdir / "root"
    root.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "IPYTHON"))}
    env.update(
        HOME=str(workdir / "home"),
        XDG_CONFIG_HOME=str(workdir / "home" / ".config"),
        XDG_DATA_HOME=str(workdir / "home" / ".local" / "share"),
        XDG_CACHE_HOME=str(workdir / "home" / ".cache"),
        JUPYTER_CONFIG_DIR=str(workdir / "jupyter" / "config"),
        JUPYTER_DATA_DIR=str(workdir / "jupyter" / "data"),
        JUPYTER_RUNTIME_DIR=str(workdir / "jupyter" / "runtime"),
        IPYTHONDIR=str(workdir / "ipython"),
        JUPYTER_NO_CONFIG="1",  # ignore config files (/etc/jupyter, the venv's etc/jupyter): flags only
        JUPYTER_PLATFORM_DIRS="1",
    )
    for attempt in range(3):
        port = _free_port()
        url = f"http://127.0.0.1:{port}/"
        log = workdir / f"jupyter-{attempt}.log"
        cmd = [
            sys.executable, "-m", "jupyterlab",
            "--no-browser",
            "--allow-root",  # the test runs as root in CI containers; production never does
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",  # fail instead of silently taking another port
            f"--ServerApp.root_dir={root}",
            *auth_args,
        ]
        started = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            while time.monotonic() - started < START_TIMEOUT_S:
                if proc.poll() is not None:
                    break
                if _answers(url):
                    return LabServer(url, proc, log, time.monotonic() - started)
                time.sleep(0.2)
        except BaseException:
            _stop(proc)
            raise
        _stop(proc)
        tail = _log_tail(log)
        if proc.returncode is not None and "already in use" in tail and attempt < 2:
            continue  # another process took the port between our probe and the server's bind
        why = (f"exited with code {proc.returncode} before answering" if proc.returncode is not None and
               time.monotonic() - started < START_TIMEOUT_S else f"did not answer within {START_TIMEOUT_S:g} s")
        pytest.fail(f"jupyter lab on {url} {why}; log:\n{tail}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def protected_lab(tmp_path_factory):
    from jupyter_server.auth import passwd

    # jupyter_server 2.x: the password lives on PasswordIdentityProvider (ServerApp.password is a deprecated
    # alias); with a password set the token defaults to '' already, the explicit empty token makes sure a
    # JUPYTER_TOKEN from the environment cannot add a second way in.
    server = _start_lab(tmp_path_factory.mktemp("lab-protected"), [
        f"--PasswordIdentityProvider.hashed_password={passwd(PASSWORD)}",
        "--IdentityProvider.token=",
    ])
    try:
        yield server
    finally:
        _stop(server.proc)


@pytest.fixture(scope="module")
def open_lab(tmp_path_factory):
    # No password and an empty token: jupyter_server starts, logging only
    # "All authentication is disabled. Anyone who can connect to this server will be able to run code."
    server = _start_lab(tmp_path_factory.mktemp("lab-open"), ["--IdentityProvider.token="])
    try:
        yield server
    finally:
        _stop(server.proc)


def _context(url: str) -> Context:
    stack, node = _cu117()
    return Context(stack, {**node, "jupyter_url": url})


def _login_and_list(url: str, password: str) -> tuple[int, int]:
    """Log in through the login form as a browser would; return the HTTP status of the login POST and
    of the GET /api/contents that follows with the cookies it set."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor(jar))
    opener.open(url + "login", timeout=10).read()
    xsrf = next(c.value for c in jar if c.name == "_xsrf")
    form = urllib.parse.urlencode({"password": password, "_xsrf": xsrf}).encode()
    codes = []
    for request in (urllib.request.Request(url + "login", data=form), urllib.request.Request(url + "api/contents")):
        try:
            with opener.open(request, timeout=10) as resp:
                codes.append(resp.status)
        except urllib.error.HTTPError as exc:
            codes.append(exc.code)
    return codes[0], codes[1]


@needs_jupyterlab
def test_real_protected_server_passes(protected_lab):
    version = importlib.metadata.version("jupyter_server")
    v = jupyter_server_check(_context(protected_lab.url))
    assert v.status is Status.PASS, (v.message, _log_tail(protected_lab.log))
    assert v.message == (f"JupyterLab {version} answers at {protected_lab.url} "
                         "and refuses unauthenticated API calls")
    assert v.measured["GET /api/contents"].value == "403"
    assert v.measured["GET /api/sessions"].value == "403"


@needs_jupyterlab
def test_real_protected_server_really_takes_the_password(protected_lab):
    # The refusal above is auth at work, not a broken server: the password opens the same API.
    assert _login_and_list(protected_lab.url, "wrong-password") == (401, 403)
    assert _login_and_list(protected_lab.url, PASSWORD) == (200, 200)  # 302 to /lab, followed


def test_real_server_down_fails():  # needs no jupyterlab: nobody listens on the port
    url = f"http://127.0.0.1:{_free_port()}/"
    v = jupyter_server_check(_context(url))
    assert v.status is Status.FAIL
    assert v.message.startswith(f"JupyterLab not reachable at {url}: connection refused")
    assert "systemctl status jupyterlab" in v.remediation


@needs_jupyterlab
def test_real_server_without_auth_fails(open_lab):
    v = jupyter_server_check(_context(open_lab.url))
    assert v.status is Status.FAIL, v.message
    assert "accepts unauthenticated API calls" in v.message
    assert "GET /api/contents answered 200" in v.message and "GET /api/sessions answered 200" in v.message
    assert "All authentication is disabled" in open_lab.log.read_text(errors="replace")
