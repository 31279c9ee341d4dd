"""Runs one check in its own process: ``python -m checks.worker REQUEST.json RESULT.json``.

The request holds the check's ``module:function`` target and the run's context; the verdicts are
written to RESULT.json. Anything the check prints goes to this process's stdout/stderr, never into
the result. A crash (signal, os.abort, hard exit) leaves no result file: the runner reports it.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from checks.registry import CheckSpec, Context
from checks.runner import verdicts_of


def main(argv: list[str]) -> int:
    request_path, result_path = argv
    with open(request_path, encoding="utf-8") as fh:
        request = json.load(fh)
    spec = CheckSpec(**request["spec"])
    ctx = Context.from_dict(request["context"])
    try:
        verdicts = verdicts_of(spec.load()(ctx))
        payload = {"ok": True, "verdicts": [v.__dict__ | {"status": v.status.label} for v in verdicts]}
    except Exception as exc:  # reported as an error result by the runner
        payload = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    tmp = result_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, default=lambda v: v.to_dict())
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
