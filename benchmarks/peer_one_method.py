"""The peer of ``invoke finetune``: a plain PEFT script that fine-tunes ONE method in its own Python
process, as one would write it by hand (one notebook per method, like the seed's).

It does the same work per method as the smoke run on the tiny model (same data, same tiny random
Bloom, 30 steps, batch 8, then held-out loss, save, reload, generate and merge where the method
merges) so that benchmarks/finetune_cpu.py can compare the two fairly: the difference is that this
script pays the torch/transformers/peft import and the model build once per method.

    python benchmarks/peer_one_method.py lora [--steps 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()

import torch  # noqa: E402
from peft import (  # noqa: E402
    AdaLoraConfig,
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import BloomConfig, BloomForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checks.finetune import data as D  # noqa: E402  (the same bundled data, tiny tokenizer and model shape)
from checks.finetune.model import SHAPES  # noqa: E402


def config_for(method: str, steps: int, tokenizer_dir: str):
    if method == "lora":
        return LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.1,
                          target_modules=["query_key_value"])
    if method == "adalora":
        return AdaLoraConfig(task_type="CAUSAL_LM", init_r=12, target_r=8, beta1=0.85, beta2=0.85,
                             tinit=steps // 5, tfinal=steps // 5, deltaT=max(1, steps // 10), lora_alpha=32,
                             lora_dropout=0.1, target_modules=["query_key_value"], total_step=steps)
    if method == "ia3":
        return IA3Config(task_type="CAUSAL_LM", target_modules=["query_key_value", "mlp.dense_4h_to_h"],
                         feedforward_modules=["mlp.dense_4h_to_h"])
    if method == "prefix_tuning":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=30, prefix_projection=True)
    if method == "p_tuning":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, encoder_hidden_size=128)
    if method == "prompt_tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init="TEXT",
                                  prompt_tuning_init_text="Classify if the tweet is a complaint or not:",
                                  tokenizer_name_or_path=tokenizer_dir)
    raise SystemExit(f"unknown method {method!r}")


def to_tensors(batch):
    return {k: torch.tensor(v) for k, v in batch.items()}


@torch.no_grad()
def eval_loss(model, batches):
    model.eval()
    losses = [model(**b).loss.item() for b in batches]
    return sum(losses) / len(losses)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    imported = time.perf_counter() - T0

    tmp = tempfile.TemporaryDirectory()
    tokenizer = D.build_tiny_tokenizer()
    tokenizer.save_pretrained(tmp.name + "/tok")
    vocab = -(-len(tokenizer) // 8) * 8
    config = BloomConfig(vocab_size=vocab, **SHAPES["tiny"], bos_token_id=1, eos_token_id=2, pad_token_id=3)

    def build_base():
        torch.manual_seed(0)  # the same random weights every time
        return BloomForCausalLM(config)

    base = build_base()
    train, held = D.split(D.load_examples())
    pad = tokenizer.pad_token_id
    train_b = [to_tensors(b) for b in D.batches(D.encode(tokenizer, train), 8, pad)]
    held_b = [to_tensors(b) for b in D.batches(D.encode(tokenizer, held), 8, pad)]

    started = time.perf_counter()
    model = get_peft_model(base, config_for(args.method, args.steps, tmp.name + "/tok"))
    before = eval_loss(model, held_b)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for step in range(args.steps):
        loss = model(**train_b[step % len(train_b)]).loss
        loss.backward()
        optimizer.step()
        if args.method == "adalora":
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    after = eval_loss(model, held_b)
    model.save_pretrained(tmp.name + "/adapter")
    PeftModel.from_pretrained(build_base(), tmp.name + "/adapter").eval()
    prompt = torch.tensor([D.encode(tokenizer, held[:1])[0]["prompt_ids"]])
    model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                   use_cache=args.method != "prefix_tuning")
    if not model.peft_config["default"].is_prompt_learning:
        model.merge_and_unload()
    print(f"{args.method}: loss {before:.3f} -> {after:.3f}; import {imported:.2f} s, "
          f"method {time.perf_counter() - started:.2f} s, process {time.perf_counter() - T0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
