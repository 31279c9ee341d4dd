"""The HTML reports (checks/report/html.py) rendered in a real headless Chromium (Debian's ``chromium``, driven
by Playwright): no console or page errors, no request to any network URL, the failing node and check visible
on screen, as many bars per chart as the data has, strings from reports shown as text and never run.

The data: a real ``peftnode-verify`` run on this machine (no GPU: its failures, its skipped perf checks, its
smoke fine-tune on the tiny model), and, where a GPU would be needed, the perf and all-reduce judges fed with
figures an 8-GPU node gives (one GPU slow), which is what those checks put in a report."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from checks.nccl.allreduce import AllreduceProbe, judge_allreduce
from checks.perf import BENCHES, GpuSample, judge_gpus
from checks.report import Report
from checks.report.html import NO_PERF, PERF_ORDER, render_fleet_html, render_html, write_html
from checks.report.jsonreport import to_json_dict, write_json
from checks.result import GpuId, Result, Status
from tests.helpers.tools import missing, require_tool

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
STARTED = datetime(2026, 5, 4, 10, 0, 0, tzinfo=timezone.utc)
MODEL = "NVIDIA H100 80GB HBM3"
HOSTILE = ("</td><script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned=2\"> "
           "it's \"quoted\" & <marquee>moving</marquee>")


# --- data ---------------------------------------------------------------------------------------------


def gpu_results(gpus: int = 8, slow_gpu: int | None = 2, model: str = MODEL) -> list[Result]:
    """perf.gemm / perf.memory / perf.pcie and nccl.allreduce as their judges report them for ``gpus`` GPUs of
    ``model``, GPU ``slow_gpu`` at 60 % GEMM (below the floor and the node median: it fails)."""
    healthy = {"gemm_tflops": 772.0, "copy_tbps": 2.93, "h2d_gbps": 52.4, "d2h_gbps": 51.1}
    samples = []
    for i in range(gpus):
        values = {k: v * (1 + 0.004 * ((i * 7) % 5)) for k, v in healthy.items()}
        if i == slow_gpu:
            values["gemm_tflops"] *= 0.6
        samples.append(GpuSample(i, model, values, detail={"dtype": "bfloat16"},
                                 gpu=GpuId(i, f"GPU-{i:08x}-aaaa", f"00000000:{0x18 + i:02X}:00.0", f"165322{i:07d}")))
    results = []
    for bench in ("gemm", "memory", "pcie"):
        for v in judge_gpus(samples, list(BENCHES[bench].metrics), None, gpus):
            results.append(Result.from_verdict(f"perf.{bench}", "perf", v, 0.4))
    probe = AllreduceProbe(ranks=gpus, nbytes=256 << 20, device=model, seconds=1.27e-3)
    busbw = judge_allreduce(probe, None)
    busbw.subject = "torch"
    results.append(Result.from_verdict("nccl.allreduce", "nccl", busbw, 1.1))
    return results


def make_report(results: list[Result], hostname: str = "gpu-node-07", stack: str = "cu117") -> Report:
    return Report(results, {"hostname": hostname, "os": "Debian GNU/Linux 12", "kernel": "6.1.0", "arch": "x86_64",
                            "python": "3.10.12"},
                  {"name": stack, "source": f"stacks/{stack}.yml", "description": "seed stack"},
                  STARTED, STARTED + timedelta(seconds=42.5), {"quick": False})


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> tuple[dict, Path]:
    """A real verify run of this machine with the smoke fine-tune on the tiny model (no GPU here: the GPU
    checks skip, the toolkit and stack pins fail, the fine-tune passes): its JSON report and the page its
    --html wrote."""
    out = tmp_path_factory.mktemp("verify")
    proc = subprocess.run([str(VENV_BIN / "peftnode-verify"), "--model", "tiny", "--gpus", "0", "--no-progress",
                           "--json", str(out / "verify.json"), "--html", str(out / "verify.html")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    return json.loads((out / "verify.json").read_text()), out / "verify.html"


def expected_bars(data: dict) -> dict[str, list[str]]:
    """GPU indices per metric, read from the report's perf results: what each chart must draw."""
    out: dict[str, list[str]] = {}
    for r in data["results"]:
        if r["group"] == "perf" and r["gpu"]:
            for metric in PERF_ORDER:
                if metric in r["measured"]:
                    out.setdefault(metric, []).append(str(r["gpu"]["index"]))
    return {k: sorted(v, key=int) for k, v in out.items()}


# --- Chromium -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    executable = require_tool("chromium", "the HTML report tests render the pages in headless Chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed (pip install -e '.[test]'): it drives Chromium here")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


class Loaded:
    """A page opened from its file, with everything that went wrong or out while it loaded."""

    def __init__(self, browser, path: Path):
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.context = browser.new_context(viewport={"width": 1200, "height": 900})
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error"
                     else None)
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        self.page.on("request", lambda req: self.requests.append(req.url))
        self.page.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:")
                        else route.continue_())
        self.page.goto(path.as_uri(), wait_until="load")
        self.page.wait_for_timeout(100)  # let late console messages (CSP reports) arrive

    def network(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(("file:", "data:"))]

    def bars(self, chart: str) -> list[dict]:
        return self.page.eval_on_selector_all(
            f'svg.chart[data-chart="{chart}"] rect.bar',
            "els => els.map(e => ({...e.dataset, cls: e.getAttribute('class'), w: e.getBoundingClientRect().width}))")

    def visible_text(self, selector: str, text: str) -> bool:
        loc = self.page.locator(selector, has_text=text)
        return loc.count() > 0 and loc.first.is_visible()

    def clean(self) -> None:
        assert self.errors == []
        assert self.network() == []

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def load(browser):
    opened = []

    def _load(path: Path) -> Loaded:
        page = Loaded(browser, path)
        opened.append(page)
        return page

    yield _load
    for page in opened:
        page.close()


# --- the single-node page -----------------------------------------------------------------------------


@pytest.mark.slow
def test_real_verify_run_shows_its_failures_first_and_says_perf_was_skipped(real_run, load):
    real_run, html_file = real_run
    page = load(html_file)
    page.clean()
    assert page.page.locator("#verdict").inner_text() == ("HEALTHY" if real_run["exit_code"] == 0 else "UNHEALTHY")
    failing = [r["name"] for r in real_run["results"] if r["status"] in ("fail", "error")]
    assert failing, "this machine has no GPU and a dev venv: the stack's pins fail, so the run must show failures"
    for name in failing:
        assert page.visible_text("table.failures td.check", name), name
    # failures before the charts
    first_fail = page.page.locator("table.failures").first.bounding_box()["y"]
    assert first_fail < page.page.locator("#perf").bounding_box()["y"]
    assert page.visible_text("p.no-perf", NO_PERF)
    assert page.page.locator("rect.bar").count() == 0
    methods = [r for r in real_run["results"] if r["name"].startswith("finetune.methods[")
               and r["name"] != "finetune.methods[workers]" and "loss" in r["measured"]]
    assert methods, "the tiny model's smoke fine-tune ran"
    charts = page.page.eval_on_selector_all("svg.loss-chart", "els => els.map(e => [e.dataset.method, "
                                                             "e.querySelectorAll('circle.loss-point').length])")
    want = [(r["name"][len("finetune.methods["):-1],
             len(r["measured"]["train_losses"]["value"]) if "train_losses" in r["measured"] else 2) for r in methods]
    assert [tuple(c) for c in charts] == want
    assert page.page.locator("svg.loss-chart").first.is_visible()


def test_every_gpu_has_a_bar_per_metric_and_the_slow_gpu_fails_visibly(load, tmp_path):
    report = make_report(gpu_results(gpus=8, slow_gpu=2))
    data = to_json_dict(report)
    page = load(write_html(report, tmp_path / "gpu.html"))
    page.clean()
    want = expected_bars(data)
    assert set(want) == set(PERF_ORDER)
    for metric, gpus in want.items():
        bars = page.bars(metric)
        assert [b["gpu"] for b in bars] == gpus, metric
        assert all(b["w"] > 0 for b in bars)
    total = sum(len(v) for v in want.values())
    busbw = [r for r in data["results"] if r["name"].startswith("nccl.allreduce") and "busbw" in r["measured"]]
    assert len(page.bars("allreduce_busbw_gbps")) == len(busbw) == 1
    assert page.page.locator("rect.bar").count() == total + len(busbw)
    # the failing check is GPU 2's GEMM: shown in the failures table and as a red bar
    failing = [r["name"] for r in data["results"] if r["status"] == "fail"]
    assert failing == ["perf.gemm[gpu2]"]
    assert page.visible_text("table.failures td.check", "perf.gemm[gpu2]")
    assert page.visible_text("table.failures td", "serial 1653220000002")
    red = [b["gpu"] for b in page.bars("gemm_tflops") if "s-fail" in b["cls"]]
    assert red == ["2"]
    # expected figure and node median are marked on every GEMM row
    marks = page.page.eval_on_selector_all('svg.chart[data-chart="gemm_tflops"] line.mark',
                                           "els => els.map(e => e.getAttribute('class'))")
    assert marks.count("mark expected") == marks.count("mark median") == len(want["gemm_tflops"])


def test_a_bar_per_gpu_whatever_the_count(load, tmp_path):
    report = make_report(gpu_results(gpus=3, slow_gpu=None))
    page = load(write_html(report, tmp_path / "three.html"))
    page.clean()
    for metric in PERF_ORDER:
        assert [b["gpu"] for b in page.bars(metric)] == ["0", "1", "2"]
    assert page.page.locator("table.failures").count() == 0
    assert page.page.locator("#verdict").inner_text() == "HEALTHY"


def test_hostile_strings_from_a_report_are_shown_as_text_and_never_run(load, tmp_path):
    results = gpu_results(gpus=2, slow_gpu=None)
    results.append(Result(f"gpu.ecc[{HOSTILE}]", "gpu", Status.FAIL, HOSTILE, {"device": HOSTILE},
                          remediation=HOSTILE, gpu=GpuId(0, HOSTILE, HOSTILE, HOSTILE)))
    results[0].measured["device"] = results[0].measured["device"].__class__(HOSTILE)
    report = make_report(results, hostname=HOSTILE, stack=HOSTILE)
    page = load(write_html(report, tmp_path / "hostile.html"))
    page.clean()
    assert page.page.evaluate("window.__pwned") is None
    assert page.page.locator("script, img, marquee").count() == 0
    assert page.page.locator("h1").inner_text() == f"peftnode verify: {HOSTILE}"
    row = page.page.locator("table.failures tr.failure")
    assert row.count() == 1
    cells = row.locator("td").all_inner_texts()
    assert cells[1:4] == [f"gpu.ecc[{HOSTILE}]", HOSTILE, HOSTILE]
    assert HOSTILE in cells[4]
    # a string in an SVG tooltip stays text too
    assert HOSTILE in page.page.locator('rect.bar[data-gpu="0"] title').first.text_content()


def test_the_network_check_catches_a_page_that_would_fetch(load, tmp_path):
    """The detector itself: a page with a remote image is caught (blocked by the page's policy and logged, or
    requested), so a clean result above means something."""
    text = render_html(make_report(gpu_results(gpus=2, slow_gpu=None)))
    bad = tmp_path / "fetches.html"
    bad.write_text(text.replace("</body>", '<img src="http://192.0.2.1/pixel.png"></body>'))
    page = load(bad)
    assert page.errors or page.network()


def test_page_prints(load, tmp_path):
    page = load(write_html(make_report(gpu_results(gpus=4, slow_gpu=1)), tmp_path / "print.html"))
    page.page.emulate_media(media="print")
    assert page.visible_text("table.failures td.check", "perf.gemm[gpu1]")
    assert page.page.pdf(format="A4")[:5] == b"%PDF-"


def test_no_gpu_page_without_a_browser_says_perf_was_skipped():
    report = make_report([Result("perf.gemm", "perf", Status.SKIP, "blocked by gpu.driver")])
    text = render_html(report)
    assert NO_PERF in text and "blocked by gpu.driver" in text
    assert 'class="bar' not in text


# --- the fleet page -------------------------------------------------------------------------------------


FLEET_CLI = "import sys; from checks.cli import fleet_console_main; sys.argv[0] = 'peftnode-fleet-report'; " \
            "fleet_console_main()"


def make_fleet_run(run: Path) -> tuple[dict, dict]:
    """A run directory as verify.yml leaves it, read by fleet-report's own code: two real quick verify runs
    (one whose jupyter check fails: nothing listens on its port here), two GPU nodes' reports from the judges
    (one with a slow GPU), a node that never reported, and two node pairs (one slow link). fleet-report's CLI
    writes the fleet JSON and the page. Returns the fleet JSON, each node's verify JSON by host, the page."""
    hosts = ["cpu-a", "cpu-b", "gpu-01", "gpu-02", "gpu-03"]
    for host, only in (("cpu-a", "system"), ("cpu-b", "system,jupyter")):
        proc = subprocess.run([str(VENV_BIN / "peftnode-verify"), "--quick", "--gpus", "0", "--only", only,
                               "--no-progress", "--json", str(run / f"{host}.json")], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode in (0, 1), proc.stderr[-2000:]
    write_json(make_report(gpu_results(gpus=8, slow_gpu=None), hostname="gpu-01"), run / "gpu-01.json")
    write_json(make_report(gpu_results(gpus=8, slow_gpu=5), hostname="gpu-02"), run / "gpu-02.json")
    (run / "gpu-03.noreport.json").write_text(json.dumps({
        "schema": "peftnode.fleet.noreport/1", "host": "gpu-03", "kind": "unreachable",
        "reason": "ssh: connect to host gpu-03 port 22: No route to host", "rc": None, "stderr_tail": ""}))
    (run / "pairs").mkdir()
    for (a, b), busbw, status in ((("gpu-01", "gpu-02"), 44.1, "pass"), (("gpu-02", "gpu-03"), 12.5, "fail")):
        (run / "pairs" / f"{a}--{b}.json").write_text(json.dumps({
            "schema": "peftnode.fleet.pair/1", "hosts": [a, b], "backend": "nccl", "world_size": 16,
            "nproc_per_node": 8, "status": status, "message": f"busbw {busbw} GB/s", "busbw_gbps": busbw,
            "algbw_gbps": busbw / 1.875, "expected_gbps": 45.0, "floor_ratio": 0.8, "sizes": [],
            "started_at": "2026-05-04T10:00:00Z", "duration_s": 3.0}))
    (run / "run.json").write_text(json.dumps({"schema": "peftnode.fleet.run/1", "run_id": "r-0504",
                                              "started_at": "2026-05-04T10:00:00Z", "stack": "cu117",
                                              "hosts": hosts}))
    out = run / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", FLEET_CLI, str(run), "--json", str(out / "fleet.json"),
                           "--html", str(out / "fleet.html")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]  # failing nodes
    fleet = json.loads((out / "fleet.json").read_text())
    reports = {h: json.loads((run / f"{h}.json").read_text()) for h in hosts if (run / f"{h}.json").exists()}
    return fleet, reports, out / "fleet.html"


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory):
    return make_fleet_run(tmp_path_factory.mktemp("fleet"))


def test_fleet_page_names_the_failing_nodes_and_checks_and_draws_every_bar(fleet_run, load):
    fleet, reports, html_file = fleet_run
    page = load(html_file)
    page.clean()
    assert page.page.locator("#verdict").inner_text() == fleet["verdict"] == "UNHEALTHY"
    bad = {n["host"]: n for n in fleet["nodes"] if n["status"] in ("fail", "error", "no report")}
    assert set(bad) >= {"cpu-b", "gpu-02", "gpu-03"}
    for host, node in bad.items():
        row = page.page.locator(f'table.matrix tr[data-host="{host}"]')
        assert row.is_visible() and row.get_attribute("data-status") == node["status"]
        checks = [f["check"] for f in node["failures"] if f["status"] in ("fail", "error")]
        for check in checks:
            failing_row = page.page.locator("table.failures tr.failure", has_text=host).filter(has_text=check)
            assert failing_row.first.is_visible(), (host, check)
    assert page.visible_text("table.failures tr.failure", "No route to host")
    # per-node charts: a bar per GPU and metric, for every node with figures
    for host, data in reports.items():
        for metric, gpus in expected_bars(data).items():
            bars = page.page.eval_on_selector_all(
                f'section.node[data-host="{host}"] svg.chart[data-chart="{metric}"] rect.bar',
                "els => els.map(e => e.dataset.gpu)")
            assert bars == gpus, (host, metric)
    # busbw: a bar per node that measured one; a bar per pair
    with_busbw = [n["host"] for n in fleet["nodes"] if (n.get("metrics") or {}).get("allreduce_busbw_gbps")]
    assert [b["host"] for b in page.bars("allreduce_busbw_gbps")] == with_busbw
    assert len(with_busbw) == 2
    assert len(page.bars("pair_busbw_gbps")) == len(fleet["pairs"]) == 2


def test_fleet_page_draws_the_fleet_figures_when_node_reports_are_absent(fleet_run, load, tmp_path):
    fleet, _, _ = fleet_run
    path = tmp_path / "bare.html"
    path.write_text(render_fleet_html(fleet, {}))
    page = load(path)
    page.clean()
    assert page.visible_text("table.matrix td.host", "gpu-02")
    for node in fleet["nodes"]:
        for metric in PERF_ORDER:
            per_gpu = (node.get("metrics") or {}).get(metric) or {}
            bars = page.page.eval_on_selector_all(
                f'section.node[data-host="{node["host"]}"] svg.chart[data-chart="{metric}"] rect.bar',
                "els => els.map(e => e.dataset.gpu)")
            assert sorted(bars, key=int) == sorted(per_gpu, key=int), (node["host"], metric)
