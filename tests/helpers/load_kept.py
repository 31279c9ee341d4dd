"""Reload every adapter ``invoke finetune --keep DIR`` kept, as a user would, and compare its logits.

Run in a fresh interpreter: ``python tests/helpers/load_kept.py DIR``. It imports torch, transformers and
peft and nothing of peftnode; for each ``DIR/<method>/adapter`` it loads the base the adapter's config
names, puts the adapter on it with ``PeftModel.from_pretrained``, runs the kept batch and prints one JSON
line per method: ``{"method", "max_abs_diff", "base", "peft_type"}`` (``max_abs_diff`` against the kept
logits). Logits come from the model PEFT returns; for methods that inject layers, from the transformers
model inside it (``get_base_model()``), since PEFT < 0.5 cannot run a reloaded AdaLoRA's own forward.
"""

import json
import os
import sys

import peft
import torch
import transformers

PROMPT_LEARNING = {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT", "CARTRIDGE"}


def main(keep_dir):
    for method in sorted(os.listdir(keep_dir)):
        adapter = os.path.join(keep_dir, method, "adapter")
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            continue
        with open(os.path.join(adapter, "adapter_config.json")) as fh:
            config = json.load(fh)
        base = transformers.AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
        model = peft.PeftModel.from_pretrained(base, adapter).eval()
        check = torch.load(os.path.join(keep_dir, method, "reload_check.pt"), weights_only=True)
        ids, mask = check["input_ids"], check["attention_mask"]
        run = model if config["peft_type"] in PROMPT_LEARNING else model.get_base_model()
        with torch.no_grad():
            logits = run(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:].float()[mask.bool()]
        diff = float((logits - check["logits"]).abs().max()) if logits.shape == check["logits"].shape else None
        print(json.dumps({"method": method, "max_abs_diff": diff, "base": config["base_model_name_or_path"],
                          "peft_type": config["peft_type"],
                          "tokenizer": config.get("tokenizer_name_or_path")}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
    # the last line: proof that nothing of peftnode was needed
    print(json.dumps({"peftnode_modules_imported": sorted(name for name in sys.modules
                                                          if name.split(".")[0] in ("checks", "tests"))}))
