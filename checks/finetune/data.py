"""The smoke fine-tune's data: a small bundled set of tweet-like lines labelled ``complaint`` or
``no complaint`` (written for this project), in the seed's prompt format::

    Tweet text : <text> Label : <label></s>

Prompt tokens are labelled -100 so the loss covers only the answer; batches are left-padded, as a
decoder-only model needs for generation. Nothing here imports torch at module import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent / "data" / "complaints.jsonl"
LABELS = ("complaint", "no complaint")
MAX_LENGTH = 64  # the seed's max_length
HELD_OUT_EVERY = 5  # every fifth pair of lines (one complaint, one not) is held out

# Special tokens in the order Bloom numbers them (unk 0, bos 1, eos 2, pad 3).
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"


@dataclass(frozen=True)
class Example:
    text: str
    label: str

    @property
    def prompt(self) -> str:
        return f"Tweet text : {self.text} Label : "


def load_examples(path: Path = DATA_FILE) -> list[Example]:
    examples = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("label") not in LABELS or not str(row.get("text", "")).strip():
                raise ValueError(f"{path}:{number}: expected a text and a label in {LABELS}, got {row!r}")
            examples.append(Example(row["text"].strip(), row["label"]))
    return examples


def split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train, held-out): the file alternates labels, so holding out whole pairs keeps both balanced."""
    train, held_out = [], []
    for i, ex in enumerate(examples):
        (held_out if (i // 2) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train).append(ex)
    return train, held_out


def build_tiny_tokenizer(examples: list[Example] | None = None):
    """A word-level tokenizer trained on the bundled data in milliseconds, wrapped as a
    PreTrainedTokenizerFast with Bloom's special-token ids. Needs no download."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    examples = examples if examples is not None else load_examples()
    corpus = [ex.prompt + ex.label for ex in examples] + [f"Label : {label}" for label in LABELS]
    core = Tokenizer(models.WordLevel(unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    core.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=[UNK, BOS, EOS, PAD]))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNK, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, padding_side="left")


def encode(tokenizer, examples: list[Example], max_length: int = MAX_LENGTH) -> list[dict]:
    """One dict per example: ``input_ids`` (prompt + answer + eos) and ``labels`` (-100 on the prompt).
    Too long a prompt is cut from the left so the answer always survives."""
    eos = tokenizer.eos_token_id
    rows = []
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(ex.label, add_special_tokens=False)["input_ids"] + [eos]
        prompt = prompt[-(max_length - len(answer)):]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer,
                     "prompt_ids": prompt})
    return rows


def collate(rows: list[dict], pad_id: int) -> dict[str, list[list[int]]]:
    """Left-pad a batch: pads get attention 0 and label -100."""
    width = max(len(r["input_ids"]) for r in rows)
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        pad = width - len(r["input_ids"])
        out["input_ids"].append([pad_id] * pad + r["input_ids"])
        out["attention_mask"].append([0] * pad + [1] * len(r["input_ids"]))
        out["labels"].append([-100] * pad + r["labels"])
    return out


def batches(rows: list[dict], batch_size: int, pad_id: int) -> list[dict[str, list[list[int]]]]:
    return [collate(rows[i:i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]
