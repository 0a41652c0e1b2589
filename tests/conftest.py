"""Offline fixtures: a tokenizer trained in-process and tiny Llama models built from configs."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (make test: two workers) each worker gets one core.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

ROOT = Path(__file__).resolve().parents[1]  # the repository
FIXTURES = Path(__file__).parent / "fixtures"  # data files the tests read

# ChatML without {% generation %} markers, like most stock templates.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = [
    "the",
    "cat",
    "dog",
    "sat",
    "on",
    "a",
    "mat",
    "hi",
    "yo",
    "what",
    "is",
    "two",
    "plus",
    "three",
    "four",
    "five",
    "answer",
    "question",
]


def _corpus(n: int = 3000):
    rng = random.Random(0)
    for _ in range(n):
        yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHATML
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture()
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def offline_env() -> dict[str, str]:
    """Environment for CLI subprocesses: offline, one thread each (several may share 2 cores)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture()
def one_thread():
    """One torch thread for the test (pytestmark = pytest.mark.usefixtures("one_thread")): for tiny
    models on a shared 2-core machine a second thread only adds spin-waiting (one training step
    goes from ~5 ms to ~0.5 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`chatsft ARGV` in a subprocess, offline: exit code, stdout and stderr as text."""
    return subprocess.run(
        [sys.executable, "-m", "chatsft", *argv],
        capture_output=True,
        text=True,
        env=offline_env(),
        timeout=timeout,
    )


def write_jsonl(path: Path, rows) -> Path:
    """Rows as a JSON Lines file (parent folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_model(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture()
def model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture()
def model_dir(tmp_path, tokenizer):
    """A local model folder as save_pretrained writes it, with its tokenizer beside it."""
    path = tmp_path / "tiny-model"
    make_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def chats(n: int = 16, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        msgs = []
        for _ in range(rng.randint(1, 2)):
            msgs.append({"role": "user", "content": " ".join(rng.sample(WORDS, 4))})
            msgs.append({"role": "assistant", "content": " ".join(rng.sample(WORDS, 3))})
        rows.append({"messages": msgs})
    return rows


CHROMIUM = "/usr/bin/chromium"
# .ci/run installs Chromium, so in CI a missing browser fails the test instead of skipping it.
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
    reason="the browser check needs /usr/bin/chromium (apt-get install chromium; .ci/run does)",
)


def dump_dom(page, tmp_path) -> str:
    """The page's DOM after headless Chromium has loaded it (scripts run, images decoded)."""
    import subprocess

    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class CountSyncs(TorchDispatchMode):
    """Counts ops that make a CUDA host wait for the device (data-dependent sizes, scalar reads)."""

    SYNCING = {"aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name in ("aten::index", "aten::index_put_", "aten::index_put") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        )
        self.count += name in self.SYNCING or bool_index
        return func(*args, **(kwargs or {}))


def trained_mask_of(row: dict) -> list[bool]:
    """A prepared row's trained mask, read from its labels (TRL's layout: the token id where
    trained, -100 elsewhere); the labels must be the row's own ids wherever they are set."""
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels)
    assert all(label in (-100, t) for t, label in zip(ids, labels))
    return [label != -100 for label in labels]


def sft_config(tmp_path, **kw):
    """A short SFTConfig for tests: 2 steps of 4 rows, 64 tokens, no saving, no report."""
    from chatsft import SFTConfig

    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        max_length=64,
        training_report=False,
    )
    return SFTConfig(**{**base, **kw})
