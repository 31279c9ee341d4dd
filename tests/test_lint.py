"""`invoke lint` is part of the suite, so CI keeps every linter (and the site.yml syntax check) green."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_invoke_lint_is_clean():
    bindir = Path(sys.executable).parent
    proc = subprocess.run([str(bindir / "invoke"), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(ROOT / ".cache" / "lint-home")})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "lint: all clean" in proc.stdout
