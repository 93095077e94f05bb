"""The report opens in headless Chromium with every figure decoded and no console error.

Skips when Chromium is absent, unless CI is set: then it fails, so CI cannot pass without the check.
"""

import html
import json
import os
import re
import shutil
import subprocess

import pytest

from analysis.report import write_report
from analysis.synthetic import study

# Allows the probe's inline script and data: images; anything fetched from elsewhere is blocked and
# reported, so a report that needed the network would fail here.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
PROBE = """<meta http-equiv="Content-Security-Policy" content="%s">
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push('error: ' + (e.message || (e.target && e.target.outerHTML.slice(0, 80)) || e.type)), true);
document.addEventListener('securitypolicyviolation', e => window.__errors.push('blocked: ' + e.blockedURI));
const consoleError = console.error;
console.error = (...a) => { window.__errors.push('console: ' + a.join(' ')); consoleError(...a); };
window.addEventListener('load', () => {
  const imgs = Array.from(document.images).map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}));
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({imgs: imgs, errors: window.__errors});
  document.body.appendChild(pre);
});
</script>
""" % CSP


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def test_report_renders_in_headless_chromium(tmp_path):
    exe = chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is not installed: the report's browser check cannot run")
        pytest.skip("chromium not installed (apt-get install -y chromium); set CI=1 to make this a failure")
    data = study(100, n_steps=10, seed=2)
    rf = write_report(data.runs, data.metrics, data.evals, tmp_path / "report", throughput=data.throughput,
                      bootstrap=10)
    page = rf.index_html.read_text()
    probed = tmp_path / "probe.html"
    probed.write_text(page.replace("<head>", "<head>\n" + PROBE, 1))
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, "the probe did not run: " + proc.stdout[-500:]
    result = json.loads(html.unescape(m.group(1)))
    assert len(result["imgs"]) == len(rf.figures) == 8
    assert all(i["ok"] and i["w"] > 0 for i in result["imgs"]), result["imgs"]
    assert result["errors"] == []
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
