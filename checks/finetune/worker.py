"""The fine-tune worker: one long-lived process per GPU (on a CPU-only node, see :mod:`checks.finetune.pool`).

It pays the torch/transformers/peft import once, builds or loads the model once, then runs methods
one at a time as the parent asks. It speaks JSON lines: requests on stdin, replies on the file
descriptor it was given as stdout, which it keeps for itself; everything anything else prints goes
to stderr (the parent keeps that in a log and quotes its tail when the worker dies).

Requests: ``{"op": "load", "model": ModelSpec dict}``, ``{"op": "run", "method": NAME, "steps": N,
"lr": float | null, "keep": DIR | null}``, ``{"op": "exit"}``. Replies: ``hello`` (after the imports), ``loaded``,
``result`` (the method's verdict, built here, and the assertions and figures behind it as ``details``;
see :mod:`checks.finetune.verdict`), ``error``. Before a ``result``, ``step`` lines report training
(``{"event": "step", "method", "step", "steps", "loss"}``): the first and last step and at most one
every :data:`STEP_EVERY_S` between them; the parent shows them as the method's progress.

Usage: ``python -m checks.finetune.worker WORKDIR`` (scratch space the parent creates and removes).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from checks import proc

STEP_EVERY_S = 0.5


def main() -> int:
    proto = proc.reply_channel()

    def reply(event: str, **fields) -> None:
        proto.write(json.dumps({"event": event, **fields}, default=str) + "\n")
        proto.flush()

    def stepper(method: str):
        last = {"at": 0.0}

        def on_step(step: int, steps: int, loss: float) -> None:
            now = time.monotonic()
            if step in (1, steps) or now - last["at"] >= STEP_EVERY_S:
                last["at"] = now
                reply("step", method=method, step=step, steps=steps, loss=loss)

        return on_step

    started = time.perf_counter()
    import warnings

    warnings.filterwarnings("ignore")
    import peft
    import torch
    import transformers

    from checks.finetune import methods as M
    from checks.finetune import model as model_mod
    from checks.finetune import run as R
    from checks.finetune import verdict as verdicts

    reply("hello", pid=os.getpid(), import_s=round(time.perf_counter() - started, 3),
          versions={"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
          device=str(R.pick_device()[0]), cuda=torch.cuda.is_available(), threads=torch.get_num_threads())
    env = None
    hint = "invoke finetune"
    workdir = sys.argv[1] if len(sys.argv) > 1 else None
    if not workdir:
        import tempfile

        workdir = tempfile.mkdtemp(prefix="peftnode-finetune-")
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.get("op")
        try:
            if op == "exit":
                break
            if op == "load":
                t0 = time.perf_counter()
                spec = model_mod.ModelSpec.from_dict(request["model"])
                hint = verdicts.rerun_hint(spec.name)
                model, tokenizer, tokenizer_path = model_mod.load(spec, tokenizer_dir=os.path.join(workdir, "tok"))
                params = model_mod.count_parameters(model)
                env = R.prepare(model, tokenizer, tokenizer_path, workdir)
                env.source = tokenizer_path if spec.kind == "path" else None
                env.model_name = spec.name
                reply("loaded", load_s=round(time.perf_counter() - t0, 3), params=params, **env.info)
            elif op == "run":
                if env is None:
                    raise RuntimeError("no model loaded")
                try:
                    kind = spec.kind if spec.kind != "random" else spec.name
                    plan = M.plan(request["method"], M.Setting(int(request["steps"]), env.tokenizer_path, kind))
                except Exception as exc:  # a seed method's config this PEFT cannot build
                    run = R._kept(request.get("keep"), R.config_failure(request["method"], exc))
                else:
                    run = R.run_method(plan, env, int(request["steps"]), request.get("lr"),
                                       stepper(request["method"]), keep_dir=request.get("keep"))
                reply("result", verdict=verdicts.to_dict(run.verdict(hint)), details=run.details())
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception as exc:  # reported to the parent; the worker stays usable
            reply("error", op=op, message=f"{type(exc).__name__}: {' '.join(str(exc).split())}",
                  traceback=traceback.format_exc()[-4000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
