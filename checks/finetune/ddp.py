"""One rank of the DDP LoRA fine-tune (``finetune.distributed``), started by torchrun.

Every rank builds the same LoRA model (same seed), wraps it in DistributedDataParallel (NCCL on its
GPU, gloo on the CPU), trains ``steps`` steps on its own shard of the bundled data, and measures the
held-out loss before and after. Then the ranks compare what DDP must keep equal: each rank hashes the
exact bytes of its adapter tensors, the hashes are all-gathered, and rank 0's adapter is broadcast so
each rank also knows its largest difference from it. Timing leaves the first step out (warm-up).

Usage (torchrun): ``python -m torch.distributed.run --standalone --nproc_per_node N -m checks.finetune.ddp RUN_DIR``.
"""

from __future__ import annotations

import contextlib
import sys
import time

from checks.finetune import ranks as R

BATCH_SIZE = 8


def body(run_dir: str, status: R.Status) -> None:
    config = R.read_config(run_dir)
    rank, world, local_rank = (status.data[k] for k in ("rank", "world_size", "local_rank"))
    status.stage("import")
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from checks.finetune.run import _grad_scaler, held_out_loss, peak_memory

    backend = config["backend"]
    device, amp = R.device_for(backend, local_rank)
    status.stage("init_process_group", backend=backend, device=str(device),
                 device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 torch=torch.__version__)
    dist.init_process_group(backend, timeout=timedelta(seconds=float(config["timeout_s"])))
    status.update(world_size_seen=dist.get_world_size(), rank_seen=dist.get_rank())
    status.stage("load_model")
    t0 = time.perf_counter()
    model, tokenizer, plan = R.load_lora(config, run_dir, rank)
    model.to(device)
    train, held_out = R.shard(tokenizer, rank, world, BATCH_SIZE, device)
    adapters = R.adapter_tensors(model)
    status.update(load_s=round(time.perf_counter() - t0, 3), train_batches=len(train),
                  adapter_tensors=len(adapters), adapter_params=sum(p.numel() for p in adapters.values()))

    status.stage("ddp_wrap")
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    loss_before = held_out_loss(model.eval(), held_out)

    steps = int(config["steps"])
    lr = float(config.get("lr") or plan.lr)
    optimizer = torch.optim.AdamW(list(adapters.values()), lr=lr)
    scaler = _grad_scaler() if amp == torch.float16 else None
    losses, tokens, timed_tokens, timed_from = [], 0, 0, 1 if steps > 1 else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ddp.train()
    started = time.perf_counter()
    for step in range(steps):
        status.stage(f"train step {step + 1}/{steps}")
        if step == timed_from:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        batch = train[step % len(train)]
        with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            loss = ddp(**batch).loss
        # a non-finite loss is recorded, not raised: every rank must keep stepping or the others hang
        losses.append(float(loss.detach()))
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n = int(batch["attention_mask"].sum())
        tokens += n
        timed_tokens += n if step >= timed_from else 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = max(time.perf_counter() - started, 1e-9)
    timed = steps - timed_from
    loss_after = held_out_loss(model.eval(), held_out)
    status.update(train_losses=losses, loss_before=loss_before, loss_after=loss_after, steps=steps, lr=lr,
                  timed_steps=timed, train_s=round(elapsed, 4), tokens=tokens,
                  steps_per_s=round(timed / elapsed, 3), tokens_per_s=round(timed_tokens / elapsed, 1),
                  amp=str(amp).replace("torch.", "") if amp else "float32")
    status.stage("compare_adapters")
    whole, per_tensor, checksum, values = R.digest(adapters)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "digest": whole, "tensors": per_tensor})
    flat = torch.cat([p.detach().float().reshape(-1) for p in adapters.values()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    max_diff = float((flat - reference).abs().max()) if flat.numel() else 0.0
    first = gathered[0]["tensors"]
    differing = {str(g["rank"]): [n for n, h in g["tensors"].items() if first.get(n) != h]
                 for g in gathered if g["digest"] != gathered[0]["digest"]}
    dist.barrier()
    memory, memory_kind = peak_memory(device)
    status.update(ok=True, stage="done", adapter_sha256=whole, adapter_checksum=checksum, adapter_values=values,
                  gathered_digests=[g["digest"] for g in gathered], differing=differing,
                  max_abs_diff_vs_rank0=max_diff, peak_memory_bytes=memory, peak_memory_kind=memory_kind)
    dist.destroy_process_group()


def main() -> int:
    return R.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
