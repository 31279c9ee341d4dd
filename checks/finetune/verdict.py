"""One method's outcome as a :class:`~checks.result.Verdict`, from the worker that ran it to the report.

:func:`checks.finetune.run.run_method` returns a :class:`MethodRun` (its status a
:class:`~checks.result.Status`, every named assertion, the figures); the worker turns it into the
method's Verdict and sends that (:func:`to_dict`) with the assertions and figures beside it as
details; the pool rebuilds the Verdict (:func:`from_dict`). A method the pool itself has to judge
(it timed out, its worker crashed or could not start) becomes a MethodRun there, judged the same way.

No torch here: the parent imports this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from checks.result import GpuId, Status, Value, Verdict

MEMORY_KINDS = {"cuda_max_allocated": "CUDA allocator peak during the method",
                "cpu_rss_increase": "CPU: rise of the worker's resident memory during the method",
                "cpu_peak_rss": "CPU: the process's peak resident memory"}


@dataclass
class MethodRun:
    """What one method's run found."""

    method: str
    status: Status
    message: str
    assertions: dict[str, dict] = field(default_factory=dict)  # name -> {"ok": True|False|None, "detail": str}
    metrics: dict = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # assertions that failed
    not_run: list[str] = field(default_factory=list)  # assertions an earlier failure prevented
    info: dict = field(default_factory=dict)  # peft_type, seed, steps, device, notes

    def details(self) -> dict:
        """The evidence behind the verdict (JSON-safe): every assertion with its detail, every figure."""
        return {"assertions": self.assertions, "metrics": self.metrics, "failed": self.failed,
                "not_run": self.not_run, **self.info}

    def verdict(self, rerun_hint: str = "invoke finetune") -> Verdict:
        """The report line: subject the method; loss, trainable parameters, throughput, wall time, peak
        memory and the assertion count measured; the failed assertions named in the remediation."""
        m = self.metrics
        measured: dict = {}
        if "loss_before" in m and "loss_after" in m:
            measured["loss"] = Value(f"{m['loss_before']:.3f}->{m['loss_after']:.3f}")
        for key, unit in (("trainable_params", None), ("steps_per_s", "steps/s"), ("tokens_per_s", "tokens/s"),
                          ("wall_s", "s")):
            if isinstance(m.get(key), (int, float)) and math.isfinite(m[key]):
                measured[key] = Value(m[key], unit)
        losses = m.get("train_losses")
        if isinstance(losses, list) and losses and all(isinstance(x, (int, float)) for x in losses):
            measured["train_losses"] = Value(losses)  # one per step: the HTML report's loss curve
        drop = m.get("loss_relative_drop")
        if isinstance(drop, (int, float)) and math.isfinite(drop):
            measured["loss_drop"] = Value(round(100 * drop, 2), "%")
        for key, unit in (("reload_max_abs_diff", None), ("adapter_bytes", "bytes"), ("adapter_params_saved", None)):
            if isinstance(m.get(key), (int, float)) and math.isfinite(m[key]):
                measured[key] = Value(m[key], unit)
        if m.get("adapter_format"):
            measured["adapter_format"] = Value(m["adapter_format"])
        if m.get("peak_memory_bytes") is not None:
            measured["peak_memory"] = Value(round(m["peak_memory_bytes"] / 2**20, 1), "MiB")
            # what the figure is: the GPU allocator's peak in the method, or the RSS rise during it on the CPU
            measured["peak_memory_kind"] = Value(MEMORY_KINDS.get(m.get("peak_memory_kind"),
                                                                  m.get("peak_memory_kind") or "?"))
        judged = self.status in (Status.PASS, Status.FAIL)
        applicable = [a for a in self.assertions.values() if a.get("ok") is not None]
        if applicable and judged:
            measured["assertions"] = Value(f"{sum(1 for a in applicable if a['ok'])}/{len(applicable)} passed")
        expected = {}
        if judged and "loss_before" in m:
            floor = self.info.get("min_drop")
            expected["loss_after"] = Value(f"<= {m['loss_before'] * (1 - floor):.3f}" if floor
                                           else f"< {m['loss_before']:.3f}")
        remediation = None
        defects = self.info.get("peft_defects") or {}
        if self.status in (Status.FAIL, Status.ERROR, Status.WARN) and defects:
            from packaging.version import Version

            fixed_in = max((d["fixed_in"] for d in defects.values()), key=Version)
            remediation = (f"Failed assertion(s): {', '.join(self.failed)}, by a known defect of the installed PEFT "
                           f"that peft {fixed_in} fixes: upgrade PEFT to >= {fixed_in} (the stack's venv "
                           f"requirements), then rerun: {rerun_hint} --methods {self.method}.")
        elif self.status in (Status.FAIL, Status.ERROR):
            remediation = (f"Failed assertion(s): {', '.join(self.failed) or 'see message'}. Rerun this method alone "
                           f"to see it: {rerun_hint} --methods {self.method}; a PEFT/transformers/torch version "
                           f"mismatch is the usual cause when every method fails the same way.")
        return Verdict(self.status, self.message, measured, expected, remediation, subject=self.method)


def failure(method: str, status: Status, assertion: str, message: str, elapsed_s: float) -> MethodRun:
    """A method that ended without a result of its own (timeout, crash, a worker that would not start)."""
    return MethodRun(method, status, message, assertions={assertion: {"ok": False, "detail": message}},
                     metrics={"wall_s": round(elapsed_s, 3)}, failed=[assertion])


def rerun_hint(model_name: str) -> str:
    return f"invoke finetune --model {model_name}"


def to_dict(verdict: Verdict) -> dict:
    """A verdict as JSON-safe data (the worker's reply)."""
    return {"status": verdict.status.label, "message": verdict.message,
            "measured": {k: v.to_dict() for k, v in verdict.measured.items()},
            "expected": {k: v.to_dict() for k, v in verdict.expected.items()},
            "remediation": verdict.remediation, "subject": verdict.subject,
            "gpu": verdict.gpu.to_dict() if verdict.gpu else None}


def from_dict(data: dict) -> Verdict:
    return Verdict(Status.parse(data["status"]), data["message"],
                   {k: Value.from_dict(v) for k, v in (data.get("measured") or {}).items()},
                   {k: Value.from_dict(v) for k, v in (data.get("expected") or {}).items()},
                   data.get("remediation"), data.get("subject"), GpuId.from_dict(data.get("gpu")))
