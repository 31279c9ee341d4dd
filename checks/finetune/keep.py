"""``--keep DIR`` (stack ``finetune.keep_dir``): what a user keeps of a smoke fine-tune.

Per method, under ``DIR/<method>/``:

``adapter/``                 the adapter exactly as the installed PEFT's ``save_pretrained`` wrote it, its
                             ``base_model_name_or_path`` pointing at the base below (or the model directory)
``tokenizer/``               the tokenizer the method was trained with
``reload_check.pt``         the held-out batch (``input_ids``, ``attention_mask``, ``labels``) and the trained
                             adapter's float32 logits at its non-pad positions (``logits``, [tokens, vocab]);
                             ``torch.load(path, weights_only=True)`` reads it
``result.json``              the method's verdict: status, every assertion, every figure, versions

and, for the built models (``tiny``, ``random:…``), the base model once, with its tokenizer, under
``DIR/base/<model>-<sha256 of its weights, 12 hex>/`` (a directory model is not copied: the adapter points
at it). The weights' digest names the directory, so a DIR kept for one model and reused for another (or
for the same name built differently by another torch) never points an adapter at the wrong base: each
base has its own directory, and a rerun of the same base reuses it. Reloading needs only torch,
transformers and peft::

    base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path)
    model = PeftModel.from_pretrained(base, "DIR/lora/adapter").eval()

(tests/helpers/load_kept.py does exactly that for every kept method and compares the logits.)

An existing ``DIR/<method>/`` is replaced; nothing else in DIR is touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

BASE = "base"
RELOAD_CHECK = "reload_check.pt"
RESULT = "result.json"


def method_dir(keep_dir: str, method: str) -> str:
    return os.path.join(os.path.abspath(keep_dir), method)


def base_digest(model) -> str:
    """sha256 over the model's state dict: every tensor's name, dtype, shape and bytes, in name order."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def base_dir_name(model_name: str, digest: str) -> str:
    """``tiny-0123456789ab``, ``random-bloomz-560m-…``: the model's name made a safe file name, and the digest."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-.") or "model"
    return f"{slug}-{digest[:12]}"


def write_base(keep_dir: str, env) -> str:
    """The base the adapters point at: the model directory, or the built base saved once under
    DIR/base/<model>-<digest> (written to a temp name and renamed: two workers may race, and they build the
    same weights). The digest is remembered on ``env``: a worker hashes its base once."""
    if env.source:
        return os.path.abspath(env.source)
    if env.base_digest is None:
        env.base_digest = base_digest(env.base)
    target = os.path.join(os.path.abspath(keep_dir), BASE, base_dir_name(env.model_name or "model", env.base_digest))
    if not os.path.isfile(os.path.join(target, "config.json")):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        env.base.save_pretrained(tmp)
        env.tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another worker got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare_method(keep_dir: str, plan, model, env, adapter_logits) -> str:
    """Make DIR/<method>/ afresh, point the adapter's config at the kept base (and the prompt-tuning
    tokenizer at the kept tokenizer), write the tokenizer and the reload check; return where the adapter
    is to be saved."""
    import torch

    base = write_base(keep_dir, env)
    here = method_dir(keep_dir, plan.name)
    shutil.rmtree(here, ignore_errors=True)
    os.makedirs(here)
    tokenizer_dir = os.path.join(here, "tokenizer")
    env.tokenizer.save_pretrained(tokenizer_dir)
    config = model.peft_config["default"]
    config.base_model_name_or_path = base
    if getattr(config, "tokenizer_name_or_path", None):
        config.tokenizer_name_or_path = tokenizer_dir
    tensors = {k: v.detach().cpu().contiguous() for k, v in env.compare.items()}
    tensors["logits"] = adapter_logits.detach().float().cpu().contiguous()
    torch.save(tensors, os.path.join(here, RELOAD_CHECK))
    return os.path.join(here, "adapter")


def write_result(keep_dir: str, run) -> None:
    """DIR/<method>/result.json: the verdict and everything behind it (written for every method run)."""
    here = method_dir(keep_dir, run.method)
    os.makedirs(here, exist_ok=True)
    data = {"method": run.method, "status": run.status.label, "message": run.message, **run.details(),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import peft
        import torch
        import transformers

        data["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__}
    except ImportError:
        pass
    tmp = os.path.join(here, RESULT + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
    os.replace(tmp, os.path.join(here, RESULT))
