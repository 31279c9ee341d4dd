"""A check worker: ``python -m checks.worker`` runs the checks it is sent, one after another.

Requests arrive on stdin, one JSON line each: ``{"spec": CheckSpec fields, "context": Context}``.
Each gets one reply line on the process's original stdout: ``{"ok": true, "verdicts": [...]}`` or
``{"ok": false, "error": "...", "traceback": "..."}``. Anything a check or a library prints goes to
stderr (the runner's log of this worker), never into a reply. A crash (signal, os.abort, hard exit)
ends the process without a reply: the runner reports it from the exit status and the log's tail.

A persistent worker (``worker="torch"``) keeps what its checks imported and initialised (torch, the
CUDA context) for the next check; an isolated check gets a worker of its own that serves one request.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from checks import proc
from checks.registry import CheckSpec, Context
from checks.runner import verdicts_of


def serve_one(request: dict) -> dict:
    spec_fields = dict(request["spec"])
    spec_fields["needs"] = tuple(spec_fields.get("needs") or ())
    spec = CheckSpec(**spec_fields)
    ctx = Context.from_dict(request["context"])
    try:
        verdicts = verdicts_of(spec.load()(ctx))
        return {"ok": True, "verdicts": [v.__dict__ | {"status": v.status.label} for v in verdicts]}
    except Exception as exc:  # reported as an error result by the runner
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}{where}", "traceback": traceback.format_exc()}


def main() -> int:
    proto = proc.reply_channel()
    for line in sys.stdin:
        if not line.strip():
            continue
        payload = serve_one(json.loads(line))
        proto.write(json.dumps(payload, default=lambda v: v.to_dict()) + "\n")
        proto.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
