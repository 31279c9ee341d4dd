"""Which model the smoke fine-tune runs on, and how a worker builds or loads it.

A model spec is one of:

``tiny``
    A random two-layer Bloom and a word-level tokenizer trained on the bundled data: builds in well
    under a second, needs no download. For tests and for proving the software stack.
``random:bloomz-560m``
    bloomz-560m's exact configuration (24 layers, hidden 1024, 16 heads, vocabulary 250,880 =
    559,214,592 parameters) with random weights and the tiny tokenizer: a shape-accurate run (memory,
    speed, kernels) with no downloaded weights.
a directory
    A saved model (``config.json``, weights, tokenizer files), e.g. the stack's ``model.path``. A
    missing directory is a failure naming the path and how to fetch it, never a silent download;
    ``allow_download`` loads the stack's ``model.repo`` through the hub instead.

Parsing is cheap (no torch); building happens in the worker (:func:`load`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

TINY = "tiny"
RANDOM_PREFIX = "random:"

# Bloom configurations by name. Only the shape matters: weights are random.
SHAPES: dict[str, dict] = {
    TINY: {"hidden_size": 256, "n_layer": 1, "n_head": 4},
    "bloomz-560m": {"vocab_size": 250880, "hidden_size": 1024, "n_layer": 24, "n_head": 16},
}
BLOOMZ_560M_PARAMS = 559_214_592


class ModelSpecError(ValueError):
    """A model spec that names nothing buildable: a usage error (exit 2)."""


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "tiny", "random" or "path"
    name: str  # what the user wrote (or the stack's path)
    path: str | None = None  # for kind "path"
    shape: str | None = None  # for kind "random": a key of SHAPES
    repo: str | None = None  # hub repo id to fetch from when downloads are allowed
    allow_download: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        return cls(**data)

    @property
    def label(self) -> str:
        return self.name

    def missing(self) -> str | None:
        """Why this model cannot be loaded from disk (a fail message with how to fetch it), or None."""
        if self.kind != "path" or self.allow_download:
            return None
        path = Path(self.path or "")
        if (path / "config.json").is_file():
            return None
        what = "does not exist" if not path.exists() else "has no config.json"
        return f"model directory {path} {what}"

    def fetch_hint(self) -> str:
        repo = self.repo or "the model repo"
        return (f"Put the model on the node: provision it (ansible-playbook site.yml --tags model), or "
                f"`git lfs install && git lfs clone` of the hub repository {repo} into {self.path} (what the seed "
                f"did), or `huggingface-cli download {repo} --local-dir {self.path}`; or run with --allow-download, "
                f"or use --model random:bloomz-560m for a shape-accurate run without weights.")


def parse_model_spec(text: str | None, stack_model: dict | None = None, allow_download: bool = False) -> ModelSpec:
    """``text`` as given by --model (None: the stack's ``model.path``)."""
    stack_model = stack_model or {}
    repo = stack_model.get("repo")
    if text is None:
        path = stack_model.get("path")
        if not path:
            raise ModelSpecError("no --model given and the stack has no model.path")
        return ModelSpec("path", str(path), path=str(path), repo=repo, allow_download=allow_download)
    text = text.strip()
    if not text:
        raise ModelSpecError("--model: empty; give tiny, random:bloomz-560m or a model directory")
    if text == TINY:
        return ModelSpec("tiny", TINY, shape=TINY)
    if text.startswith(RANDOM_PREFIX):
        shape = text[len(RANDOM_PREFIX):]
        if shape not in SHAPES or shape == TINY:
            known = ", ".join(RANDOM_PREFIX + s for s in SHAPES if s != TINY)
            from checks.stack import quote  # here: a bare node's Python may lack yaml
            raise ModelSpecError(f"--model: unknown random model {quote(text)} (known: {known}, tiny)")
        return ModelSpec("random", text, shape=shape)
    if ":" in text.split("/", 1)[0] and not Path(text).exists():
        from checks.stack import quote  # here: a bare node's Python may lack yaml
        raise ModelSpecError(f"--model: {quote(text)} is not tiny, random:<name> or a model directory")
    if stack_model.get("path") and Path(text) == Path(stack_model["path"]):
        return ModelSpec("path", text, path=text, repo=repo, allow_download=allow_download)
    # Another directory: a repo id only when the user allows downloads and it is not a local path.
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/")) and not Path(text).exists()
    return ModelSpec("path", text, path=text, repo=text if looks_like_repo else None, allow_download=allow_download)


# --- building (worker side: imports torch/transformers) ------------------------------------------


def bloom_config(shape: str, vocab_size: int):
    from transformers import BloomConfig

    dims = dict(SHAPES[shape])
    dims.setdefault("vocab_size", vocab_size)
    # Bloom numbers its special tokens unk 0, bos 1, eos 2, pad 3, as the tiny tokenizer does.
    return BloomConfig(**dims, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def build_random(shape: str, tokenizer, seed: int = 0):
    import torch
    from transformers import BloomForCausalLM

    vocab = -(-len(tokenizer) // 8) * 8  # the tiny model's vocabulary: the tokenizer's, rounded up
    config = bloom_config(shape, vocab)
    torch.manual_seed(seed)
    return BloomForCausalLM(config)


def count_parameters(model) -> int:
    """Distinct parameters (tied embeddings counted once), as transformers' num_parameters does."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def load(spec: ModelSpec, tokenizer_dir: str | None = None):
    """(model, tokenizer, tokenizer_path) for ``spec``, in float32 on the CPU, in eval mode.

    ``tokenizer_path`` is a directory holding the tokenizer (PEFT's TEXT prompt init reads it by
    path); for the tiny tokenizer it is written to ``tokenizer_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from checks.finetune.data import build_tiny_tokenizer

    if spec.kind in ("tiny", "random"):
        tokenizer = build_tiny_tokenizer()
        if tokenizer_dir is None:
            raise ValueError("a built tokenizer needs a directory to live in")
        tokenizer.save_pretrained(tokenizer_dir)
        return build_random(spec.shape, tokenizer).eval(), tokenizer, tokenizer_dir
    missing = spec.missing()
    if missing:
        raise FileNotFoundError(f"{missing}. {spec.fetch_hint()}")
    source = spec.path
    if spec.allow_download and not (Path(spec.path) / "config.json").is_file():
        if not spec.repo:
            raise FileNotFoundError(f"{spec.path} is not a model directory and names no hub repo to fetch")
        source = spec.repo
    local_only = not spec.allow_download
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only)
    return model.float().eval(), tokenizer, source
