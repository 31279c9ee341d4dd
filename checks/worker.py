"""A check worker: ``python -m checks.worker`` runs the checks it is sent, one after another.

Requests arrive on stdin, one JSON line each: ``{"spec": CheckSpec fields, "context": Context}``.
Each gets one reply line on the process's original stdout: ``{"ok": true, "verdicts": [...]}`` or
``{"ok": false, "error": "...", "traceback": "..."}``, after any number of progress lines
``{"progress": {"message": ..., "done": ..., "total": ..., "key": ..., "final": ...}}`` (what the check
reported with ``ctx.progress``, from any of its threads; the runner forwards them to the run's display
while it waits for the reply). Anything a check or a library prints goes to stderr (the runner's log of
this worker), never into a reply. A crash (signal, os.abort, hard exit) ends the process without a reply:
the runner reports it from the exit status and the log's tail.

A persistent worker (``worker="torch"``) keeps what its checks imported and initialised (torch, the
CUDA context) for the next check; an isolated check gets a worker of its own that serves one request.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback

from checks import proc
from checks.registry import CheckSpec, Context, Progress, progress_to
from checks.runner import verdicts_of


class Channel:
    """The reply stream, shared by the check's threads: whole lines only, and no progress line of a check
    after its reply (a thread it left running cannot speak for the next check)."""

    def __init__(self, stream):
        self.stream = stream
        self.lock = threading.Lock()
        self.open_for: object | None = None  # the request whose progress lines are accepted now

    def sink_for(self, request: object):
        def sink(event: Progress) -> None:
            line = json.dumps({"progress": event.to_dict()}, default=str) + "\n"
            with self.lock:
                if self.open_for is request:
                    self.stream.write(line)
                    self.stream.flush()

        return sink

    def reply(self, request: object, payload: dict) -> None:
        line = json.dumps(payload, default=lambda v: v.to_dict()) + "\n"
        with self.lock:
            self.open_for = None
            self.stream.write(line)
            self.stream.flush()


def serve_one(request: dict, sink=None) -> dict:
    spec_fields = dict(request["spec"])
    spec_fields["needs"] = tuple(spec_fields.get("needs") or ())
    spec = CheckSpec(**spec_fields)
    ctx = Context.from_dict(request["context"]).bound(sink)
    try:
        with progress_to(sink):
            verdicts = verdicts_of(spec.load()(ctx))
        return {"ok": True, "verdicts": [v.__dict__ | {"status": v.status.label} for v in verdicts]}
    except Exception as exc:  # reported as an error result by the runner
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" (at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno})" if tb else ""
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}{where}", "traceback": traceback.format_exc()}


def main() -> int:
    channel = Channel(proc.reply_channel())
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        with channel.lock:
            channel.open_for = request
        payload = serve_one(request, channel.sink_for(request))
        channel.reply(request, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
