"""JupyterLab: the server answers where the stack says, and refuses API calls that carry no credentials.

The probe (:func:`probe_jupyter`) makes three plain HTTP requests and records what came back; the judge
(:func:`judge_jupyter`) decides, without touching the network, so it can be tested on hand-made probes.

jupyter_server answers ``GET /api`` to anyone with ``{"version": "..."}``: that proves a Jupyter server
holds the port. ``GET /api/contents`` and ``GET /api/sessions`` list files and running kernels: without a
token or session cookie a protected server refuses them (403 in jupyter_server 2.x; 401, or a redirect to
``/login`` from older servers and some proxies). A 200 there means anyone who can reach the port can read
files and run code.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from checks.node import Node
from checks.registry import Context, check
from checks.result import Status, Verdict

JUPYTER_UNIT = "jupyterlab"  # the systemd unit provisioning installs
PASSWORD_VAR = "peftnode_jupyter_password_hash"  # ansible-vault variable holding the password hash
REFUSED_CODES = (401, 403)
MAX_BODY = 64 * 1024  # bytes read from /api; its answer is a few dozen
_ANY_ADDRESS = {"", "0.0.0.0", "*", "::", "[::]"}
_USER_AGENT = "peftnode-checks/jupyter"


def jupyter_url(stack: dict, node: Node) -> str | None:
    """Where JupyterLab should answer: the node's ``jupyter_url`` override, else built from the stack's
    ``jupyterlab:`` section (a wildcard bind is reached on 127.0.0.1). None when JupyterLab is disabled."""
    section = stack.get("jupyterlab") or {}
    if not section.get("enabled"):
        return None
    if node.jupyter_url:
        return node.jupyter_url
    host = str(section.get("bind") or "127.0.0.1").strip()
    if host in _ANY_ADDRESS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    base = str(section.get("base_url") or "/")
    if not base.startswith("/"):
        base = "/" + base
    if not base.endswith("/"):
        base += "/"
    return f"http://{host}:{section['port']}{base}"


@dataclass
class Answer:
    """What one HTTP request got: a status (None when no HTTP answer came), a redirect's Location, or
    why nothing came back."""

    status: int | None = None
    location: str | None = None
    error: str | None = None

    @property
    def to_login(self) -> bool:
        """A redirect to a login page (how older servers and auth proxies refuse)."""
        if self.status is None or not 300 <= self.status < 400 or not self.location:
            return False
        return "login" in urllib.parse.urlsplit(self.location).path.lower()

    @property
    def refused(self) -> bool:
        return self.status in REFUSED_CODES or self.to_login

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def describe(self) -> str:
        if self.status is None:
            return f"no answer: {self.error}" if self.error else "not tried"
        if self.location and 300 <= self.status < 400:
            return f"{self.status} to {self.location}"
        return str(self.status)


@dataclass
class JupyterProbe:
    """The three unauthenticated requests and what they showed."""

    url: str
    api: Answer = field(default_factory=Answer)  # GET {url}api
    contents: Answer = field(default_factory=Answer)  # GET {url}api/contents
    sessions: Answer = field(default_factory=Answer)  # GET {url}api/sessions
    version: str | None = None  # from /api's {"version": ...}; None when it did not look like Jupyter
    api_body: str | None = None  # the start of /api's body when it was not Jupyter's JSON

    @property
    def error(self) -> str | None:
        """Why the server could not be reached (refused, timeout, DNS, TLS...); None when it answered."""
        return self.api.error if self.api.status is None else None

    @property
    def reachable(self) -> bool:
        return self.api.status is not None

    @property
    def login_redirect(self) -> bool:
        return self.contents.to_login or self.sessions.to_login


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Report redirects instead of following them: a 302 to /login is how some servers refuse."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


# No proxies (the probe checks this node's own server; an http_proxy from the environment would send
# loopback requests elsewhere), no cookies, no redirects.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def _reason(exc: BaseException, timeout_s: float) -> str:
    """A short, readable reason for a failed request."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        inner = exc.reason
        if isinstance(inner, BaseException):
            return _reason(inner, timeout_s)
        return str(inner)
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on that port)"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"timed out after {timeout_s:g} s"
    if isinstance(exc, socket.gaierror):
        return f"DNS lookup failed ({exc.strerror or exc})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted ({exc.verify_message or exc})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc.reason or exc})"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the server"
    if isinstance(exc, (http.client.RemoteDisconnected, http.client.BadStatusLine)):
        return f"not an HTTP answer ({type(exc).__name__}: {exc})"
    if isinstance(exc, http.client.HTTPException):
        return f"bad HTTP answer ({type(exc).__name__}: {exc})"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def _get(url: str, timeout_s: float, want_body: bool = False) -> tuple[Answer, bytes]:
    """GET ``url`` without credentials; never raises. Returns the answer and (if asked) the body."""
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": _USER_AGENT})
    try:
        with _OPENER.open(request, timeout=timeout_s) as resp:
            body = resp.read(MAX_BODY) if want_body else b""
            return Answer(status=resp.status, location=resp.headers.get("Location")), body
    except urllib.error.HTTPError as exc:  # 3xx (not followed), 4xx, 5xx: an answer, not a failure
        try:
            body = exc.read(MAX_BODY) if want_body else b""
        except (OSError, http.client.HTTPException):
            body = b""
        finally:
            exc.close()
        return Answer(status=exc.code, location=exc.headers.get("Location") if exc.headers else None), body
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # refused, timeout, DNS, TLS (all OSError), garbage instead of HTTP, a malformed URL: no HTTP answer
        return Answer(error=_reason(exc, timeout_s)), b""


def probe_jupyter(url: str, timeout_s: float = 5.0) -> JupyterProbe:
    """Ask ``{url}api``, ``{url}api/contents`` and ``{url}api/sessions`` with no token and no cookie.
    Never raises; an unreachable server is recorded in ``probe.api.error``."""
    base = url if url.endswith("/") else url + "/"
    probe = JupyterProbe(url=base)
    scheme = urllib.parse.urlsplit(base).scheme.lower()
    if scheme not in ("http", "https"):
        probe.api = Answer(error=f"unsupported URL scheme {scheme or '(none)'!r}; expected http or https")
        return probe
    probe.api, body = _get(base + "api", timeout_s, want_body=True)
    if not probe.reachable:
        return probe  # the other two would only wait for the same timeout again
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        doc = None
    if probe.api.status == 200 and isinstance(doc, dict) and isinstance(doc.get("version"), str):
        probe.version = doc["version"]
    else:
        probe.api_body = body[:200].decode("utf-8", "replace").strip() or None
    probe.contents, _ = _get(base + "api/contents", timeout_s)
    probe.sessions, _ = _get(base + "api/sessions", timeout_s)
    return probe


def _port_of(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
        return str(parts.port or (443 if parts.scheme == "https" else 80))
    except ValueError:
        return "?"


def judge_jupyter(probe: JupyterProbe, url: str) -> Verdict:
    """Pure: PASS only when a Jupyter server answers at ``url`` and refuses both unauthenticated calls."""
    measured = {
        "server_version": probe.version,
        "GET /api": probe.api.describe(),
        "GET /api/contents": probe.contents.describe(),
        "GET /api/sessions": probe.sessions.describe(),
    }
    refused = "401/403 or a redirect to the login page"
    expected = {"GET /api": 200, "GET /api/contents": refused, "GET /api/sessions": refused}
    port = _port_of(url)
    service = (
        f"Check the service: systemctl status {JUPYTER_UNIT} (journalctl -u {JUPYTER_UNIT} for why it stopped); "
        f"check it listens where the stack's jupyterlab: section says (port, bind, base_url): "
        f"ss -ltnp | grep :{port}. On a node reached through an SSH tunnel, run the check on the node."
    )

    if not probe.reachable:
        return Verdict(Status.FAIL, f"JupyterLab not reachable at {url}: {probe.error or 'no answer'}",
                       measured, expected, remediation=service)

    if probe.version is None:
        what = f"HTTP {probe.api.describe()}"
        if probe.api_body:
            what += f", body {probe.api_body[:80]!r}"
        return Verdict(
            Status.FAIL,
            f"something answers at {url} but GET {url}api does not look like Jupyter ({what})",
            measured, expected,
            remediation=f"Another service may hold port {port}, or base_url is wrong. " + service,
        )

    calls = (("/api/contents", probe.contents), ("/api/sessions", probe.sessions))
    open_calls = [f"GET {path} answered {ans.status}" for path, ans in calls if ans.accepted]
    if open_calls:
        return Verdict(
            Status.FAIL,
            f"JupyterLab {probe.version} at {url} accepts unauthenticated API calls ({', '.join(open_calls)}): "
            "anyone who can reach the port can read files and run code",
            measured, expected,
            remediation=(
                "Set a password: generate a hash with "
                "python -c 'from jupyter_server.auth import passwd; print(passwd())', "
                f"store it in the ansible-vault variable {PASSWORD_VAR} and re-run the playbook, which sets "
                f"PasswordIdentityProvider.hashed_password; then systemctl restart {JUPYTER_UNIT}. "
                "Never start the server with token='' and no password."
            ),
        )

    unclear = [(path, ans) for path, ans in calls if not ans.refused]
    if unclear:
        detail = "; ".join(f"GET {p}: {a.describe()}" for p, a in unclear)
        return Verdict(
            Status.FAIL,
            f"JupyterLab {probe.version} at {url} did not clearly refuse unauthenticated calls ({detail})",
            measured, expected,
            remediation=f"Expected {refused}. Look at the server log (journalctl -u {JUPYTER_UNIT}) and any proxy "
                        "in front of it; check base_url.",
        )

    return Verdict(
        Status.PASS,
        f"JupyterLab {probe.version} answers at {url} and refuses unauthenticated API calls",
        measured, expected,
    )


@check("jupyter.server", "JupyterLab answers and refuses unauthenticated calls")
def jupyter_server(ctx: Context) -> Verdict:
    url = jupyter_url(ctx.stack, ctx.node)
    if url is None:
        return Verdict(Status.SKIP, "JupyterLab is disabled in the stack (jupyterlab.enabled: false)")
    return judge_jupyter(probe_jupyter(url), url)
