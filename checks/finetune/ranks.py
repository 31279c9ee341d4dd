"""What every torchrun rank of the distributed fine-tunes shares (rank side: imports torch lazily).

A rank reads ``RUN_DIR/config.json`` (written by :func:`checks.finetune.launch.run_torchrun`) and
reports through ``RUN_DIR/rank<N>.json``, rewritten atomically at every stage, so the parent knows
where a rank was when it hung or died. ``config``:

``model``        a ModelSpec dict (tiny, random:bloomz-560m or a directory)
``steps``        training steps
``lr``           learning rate (the LoRA seed's when absent)
``backend``      nccl or gloo
``timeout_s``    collective timeout (the launcher's deadline)
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import random
import sys
from pathlib import Path

SEED = 0
STATUS_FILE = "rank{rank}.json"


def die_with_parent() -> None:
    """Ask the kernel for SIGKILL when torchrun dies, so a killed launcher leaves no rank behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # torchrun died before the request was made
        os._exit(1)


class Status:
    """This rank's report: stage, figures and the error that stopped it, rewritten at every change."""

    def __init__(self, run_dir: str, rank: int, world: int, local_rank: int):
        self.path = Path(run_dir, STATUS_FILE.format(rank=rank))
        self.data: dict = {"rank": rank, "world_size": world, "local_rank": local_rank, "pid": os.getpid(),
                           "ok": False, "stage": "started"}
        self.write()

    def stage(self, name: str, **fields) -> None:
        self.data.update(stage=name, **fields)
        self.write()

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, default=str))
        os.replace(tmp, self.path)


def identity() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment."""
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def read_config(run_dir: str) -> dict:
    return json.loads(Path(run_dir, "config.json").read_text())


def one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


def error_fields(exc: BaseException) -> dict:
    import traceback

    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
    return {"error": one_line(exc) + at, "traceback": traceback.format_exc()[-3000:]}


# --- model, data, adapter -----------------------------------------------------------------------------


def device_for(backend: str, local_rank: int):
    """(device, autocast dtype or None): the rank's GPU under NCCL, the CPU under gloo."""
    import torch

    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda", local_rank), dtype
    return torch.device("cpu"), None


def load_lora(config: dict, run_dir: str, rank: int):
    """(PEFT LoRA model on the CPU in float32, tokenizer, plan): the seed's LoRA on the chosen model,
    built from the same seed on every rank."""
    import torch
    from peft import get_peft_model

    from checks.finetune import methods as M
    from checks.finetune import model as model_mod

    spec = model_mod.ModelSpec.from_dict(config["model"])
    model, tokenizer, tokenizer_path = model_mod.load(spec, tokenizer_dir=os.path.join(run_dir, f"tok-rank{rank}"))
    for p in model.parameters():
        p.requires_grad_(False)
    plan = M.plan("lora", M.Setting(int(config["steps"]), tokenizer_path))
    torch.manual_seed(SEED)
    return get_peft_model(model, plan.config), tokenizer, plan


def shard(tokenizer, rank: int, world: int, batch_size: int, device) -> tuple[list[dict], list[dict]]:
    """(this rank's training batches, the held-out batches): the training examples are shuffled the same
    way on every rank and dealt out round-robin, as DistributedSampler does; every rank holds out the same."""
    import torch

    from checks.finetune import data as D

    train_ex, held_ex = D.split(D.load_examples())
    random.Random(SEED).shuffle(train_ex)
    pad = tokenizer.pad_token_id
    rows = D.encode(tokenizer, train_ex)
    mine = rows[rank::world] or rows[rank % len(rows):][:1]

    def tensors(batch):
        return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in batch.items()}

    return ([tensors(b) for b in D.batches(mine, batch_size, pad)],
            [tensors(b) for b in D.batches(D.encode(tokenizer, held_ex), batch_size, pad)])


def adapter_tensors(model) -> dict:
    """The trainable (adapter) parameters by name, as PEFT names them (``default`` adapter)."""
    return {n: p for n, p in sorted(model.named_parameters()) if p.requires_grad}


def digest(tensors: dict) -> tuple[str, dict[str, str], float, int]:
    """(sha256 over every tensor's name and exact bytes, per-tensor sha256, float64 sum, values)."""
    import torch

    whole = hashlib.sha256()
    per: dict[str, str] = {}
    total, count = 0.0, 0
    for name, t in tensors.items():
        data = t.detach().to("cpu").contiguous()
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        h = hashlib.sha256(raw).hexdigest()
        per[name] = h
        whole.update(name.encode() + b"\0" + h.encode())
        total += float(data.double().sum())
        count += data.numel()
    return whole.hexdigest(), per, total, count


def finite(values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def run_main(body) -> int:
    """Run ``body(run_dir, status)`` as one rank; the status file records any exception."""
    die_with_parent()
    run_dir = sys.argv[1]
    rank, world, local_rank = identity()
    status = Status(run_dir, rank, world, local_rank)
    try:
        body(run_dir, status)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then re-raised for torchrun
        status.update(ok=False, **error_fields(exc))
        raise
    return 0
