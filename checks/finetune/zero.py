"""One rank of the DeepSpeed ZeRO stage 2 LoRA fine-tune (``finetune.deepspeed``), started by torchrun.

The seed's LoRA on the chosen model goes through ``deepspeed.initialize`` with a minimal config:
ZeRO stage 2, ``train_micro_batch_size_per_gpu`` 8, ``gradient_accumulation_steps`` 1, bf16 where the
device supports it, else fp16 with dynamic loss scaling, and torch's AdamW as the client optimizer
(DeepSpeed's own FusedAdam would compile a CUDA extension first). The engine trains ``steps`` steps;
the held-out loss is measured through the engine's module (in the engine's precision) before and
after. Reported: DeepSpeed's version, the ZeRO stage and optimizer the engine really built, losses,
steps skipped by the loss scaler, steps/s and tokens/s (first step left out), peak memory.

Usage (torchrun): ``python -m torch.distributed.run --standalone --nproc_per_node 1 -m checks.finetune.zero RUN_DIR``.
"""

from __future__ import annotations

import sys
import time

from checks.finetune import ranks as R

BATCH_SIZE = 8
ZERO_STAGE = 2
FP16_INITIAL_SCALE_POWER = 12  # 2**12: few skipped steps at the start of a short run


def ds_config(dtype: str) -> dict:
    """The minimal DeepSpeed config of the check (``dtype``: bf16 or fp16)."""
    return {
        "train_micro_batch_size_per_gpu": BATCH_SIZE,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": ZERO_STAGE},
        "zero_allow_untested_optimizer": True,  # torch's AdamW as the client optimizer
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "initial_scale_power": FP16_INITIAL_SCALE_POWER},
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def body(run_dir: str, status: R.Status) -> None:
    config = R.read_config(run_dir)
    rank, world, local_rank = (status.data[k] for k in ("rank", "world_size", "local_rank"))
    status.stage("import")
    from datetime import timedelta

    import deepspeed
    import torch

    from checks.finetune.run import held_out_loss, peak_memory

    backend = config["backend"]
    device, amp = R.device_for(backend, local_rank)
    if device.type == "cpu":
        amp = torch.bfloat16  # DeepSpeed's CPU accelerator trains in bf16
    dtype = "bf16" if amp == torch.bfloat16 else "fp16"
    status.stage("init_distributed", backend=backend, device=str(device), dtype=dtype,
                 device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 deepspeed=deepspeed.__version__, torch=torch.__version__)
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=float(config["timeout_s"])))

    status.stage("load_model")
    t0 = time.perf_counter()
    model, tokenizer, plan = R.load_lora(config, run_dir, rank)
    train, held_out = R.shard(tokenizer, rank, world, BATCH_SIZE, device)
    adapters = R.adapter_tensors(model)
    lr = float(config.get("lr") or plan.lr)
    status.update(load_s=round(time.perf_counter() - t0, 3), adapter_params=sum(p.numel() for p in adapters.values()))

    status.stage("deepspeed_initialize")
    optimizer = torch.optim.AdamW(list(adapters.values()), lr=lr)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(dtype))
    stage = engine.zero_optimization_stage()
    status.update(zero_stage=stage, optimizer=type(ds_optimizer).__name__,
                  engine_dtype=str(next(engine.module.parameters()).dtype).replace("torch.", ""),
                  train_batch_size=engine.train_batch_size())
    loss_before = held_out_loss(engine.module.eval(), held_out)

    steps = int(config["steps"])
    losses, tokens, timed_tokens, timed_from = [], 0, 0, 1 if steps > 1 else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine.train()
    started = time.perf_counter()
    for step in range(steps):
        status.stage(f"train step {step + 1}/{steps}")
        if step == timed_from:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        batch = train[step % len(train)]
        loss = engine(**batch).loss
        losses.append(float(loss.detach().float()))
        engine.backward(loss)
        engine.step()
        n = int(batch["attention_mask"].sum())
        tokens += n
        timed_tokens += n if step >= timed_from else 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = max(time.perf_counter() - started, 1e-9)
    timed = steps - timed_from
    loss_after = held_out_loss(engine.module.eval(), held_out)
    memory, memory_kind = peak_memory(device)
    status.update(ok=True, stage="done", train_losses=losses, loss_before=loss_before, loss_after=loss_after,
                  steps=steps, lr=lr, timed_steps=timed, train_s=round(elapsed, 4), tokens=tokens,
                  steps_per_s=round(timed / elapsed, 3), tokens_per_s=round(timed_tokens / elapsed, 1),
                  skipped_steps=int(getattr(engine, "skipped_steps", 0) or 0),
                  peak_memory_bytes=memory, peak_memory_kind=memory_kind)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> int:
    return R.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
