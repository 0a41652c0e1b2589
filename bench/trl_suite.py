"""TRL 1.16's own SFT tests, run offline against TRL and against chatsft.

TRL's ``tests/test_sft_trainer.py`` loads tiny models (``trl-internal-testing/tiny-*``) and
small datasets (``trl-internal-testing/zen`` and friends) from the Hugging Face Hub. ``build``
writes local stand-ins for them; ``run`` runs pytest on a copy of the TRL test folder with the Hub
switched off.

    python bench/trl_suite.py build --out /work/trl_suite/hf_home
    python bench/trl_suite.py run --tests /work/trl_suite/tests --target trl --json trl.json
    python bench/trl_suite.py run --tests /work/trl_suite/tests --target chatsft --json chatsft.json \
        [--chatsft-ref HEAD]   # a committed chatsft instead of the (possibly half-edited) tree
    python bench/trl_suite.py compare trl.json chatsft.json

The TRL test files are not part of this repository: put TRL v1.16's ``tests/test_sft_trainer.py``,
its ``testing_utils.py`` helpers, a ``conftest.py``, an empty ``__init__.py`` and
``data/template.jinja`` in the ``--tests`` folder (needs ``pip install pytest-datadir``).
``--target chatsft`` rewrites only ``from trl import SFTConfig, SFTTrainer`` into
``from chatsft import SFTConfig, SFTTrainer`` in a temporary copy; everything else (the collator
tests, ``trl.trainer.sft_trainer.DataCollatorForLanguageModeling``) still comes from TRL.

Stand-ins (``--out`` is used as ``HF_HOME``):
- models: ``hub/models--<org>--<name>/snapshots/<sha>``, the Hub cache layout, so
  ``from_pretrained("trl-internal-testing/tiny-...")`` resolves offline, revisions included. Each is
  a random-init model of the named architecture (hidden size 8-16, 2 layers), saved in bfloat16
  like the Hub ones, with a tokenizer: byte-level BPE (the pipeline of
  ``shared/bench/workload_tokenizer``) whose merges are trained on the stand-in datasets, so a Zen
  line is a handful of tokens as with the real tokenizers; the model family's special tokens (at
  Qwen's real ids 151643+ for the Qwen tokenizers, which the tests hard-code) and its real chat
  template (the copy TRL ships in ``trl/chat_templates``, which TRL recognises by identity).
- datasets: ``datasets_root/<org>/<name>/`` with a ``README.md`` listing the configs and one
  parquet file per split, the Hub layout; pytest runs with ``datasets_root`` as its working
  directory, so ``load_dataset("trl-internal-testing/zen", ...)`` loads the local folder. The rows
  are those of TRL's generator scripts (19 rows split 17/2, toolcall 8 split 7/1).
- not built: the vision-language models (``tiny-*ForConditionalGeneration``); their tests fail for
  both targets with a missing-model error.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ORG = "trl-internal-testing"
DEFAULT_HOME = Path(__file__).resolve().parents[2] / "trl_suite" / "hf_home"
QWEN2_5_REVISION = "8913f5819566"  # pinned by test_init_auto_processing_class_uses_model_revision

# ----------------------------------------------------------------------------------------------
# Data (TRL's scripts/generate_*_dataset.py rows)
# ----------------------------------------------------------------------------------------------

ZEN = [  # (prompt, completion, rejected completion); text = prompt + completion
    ("Beautiful is better than", " ugly.", " the moon."),
    ("Explicit is", " better than implicit.", " worse than nothing."),
    ("Simple is better", " than complex.", " than a long vacation."),
    ("Complex", " is better than complicated.", " is always the answer."),
    ("Flat is better than", " nested.", " chocolate."),
    ("Sparse is better", " than dense.", " without any context."),
    ("Readability", " counts.", " is optional."),
    ("Special cases aren't special", " enough to break the rules.", " enough to become unicorns."),
    ("Although practicality beats", " purity.", " reality."),
    ("Errors should never", " pass silently.", " pass their driving test."),
    ("Unless explicitly", " silenced.", " forgotten."),
    ("In the face of ambiguity, refuse", " the temptation to guess.", " the opportunity to laugh."),
    (
        "There should be one-- and preferably",
        " only one --obvious way to do it.",
        " two or more confusing methods.",
    ),
    ("Although that way may not be obvious at first unless you're", " Dutch.", " a time traveler."),
    ("Now is", " better than never.", " never better."),
    ("Although never is often", " better than *right* now.", " not even a possibility."),
    (
        "If the implementation is hard to explain,",
        " it's a bad idea.",
        " it's clearly the best choice.",
    ),
    (
        "If the implementation is easy",
        " to explain, it may be a good idea.",
        " it's probably magic.",
    ),
    (
        "Namespaces are one honking great",
        " idea -- let's do more of those!",
        " watermelon -- let's plant some!",
    ),
]

ZEN_QA = [
    ("What is better than ugly?", "Beautiful."),
    ("What is better than implicit?", "Explicit."),
    ("What is better than complex?", "Simple."),
    ("What is better than complicated?", "Complex."),
    ("What is better than nested?", "Flat."),
    ("What is better than dense?", "Sparse."),
    ("What counts?", "Readability."),
    (
        "Are special cases enough to break the rules?",
        "No, special cases aren't special enough to break the rules.",
    ),
    ("What beats purity?", "Practicality."),
    ("What should never pass silently?", "Errors."),
    ("When can errors pass silently?", "When explicitly silenced."),
    ("What should you do in the face of ambiguity?", "Refuse the temptation to guess."),
    ("How many ways should there be to do it?", "One, and preferably only one."),
    ("For whom may the way not be obvious at first?", "Dutch."),
    ("What is better than never?", "Now is better than never."),
    ("Is never better than *right* now?", "Yes, often."),
    ("What does it mean if the implementation is hard to explain?", "It means it's a bad idea."),
    (
        "What does it mean if the implementation is easy to explain?",
        "It means it may be a good idea.",
    ),
    ("Any great ideas?", "Namespaces are one honking great idea."),
]

HARMONY_IDENTITY = "You are Tiny ChatGPT, a tiny language model."


def _tool(name: str, description: str, **params: tuple[str, str]) -> dict:
    """A tool schema as ``transformers.utils.get_json_schema`` writes it."""
    properties = {p: {"type": t, "description": d} for p, (t, d) in params.items()}
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(params)},
        },
    }


def _toolcall_rows() -> dict:
    city = ("string", "The city for which to get the data.")
    tools = {
        "start_timer": _tool(
            "start_timer",
            "Starts a timer for the specified duration in seconds.",
            duration=("integer", "Duration in seconds to set the timer for."),
        ),
        "get_current_time": _tool(
            "get_current_time",
            "Returns the current time in the specified location.",
            location=("string", "The location for which to get the current time."),
        ),
        "get_air_quality_index": _tool(
            "get_air_quality_index",
            "Returns the air quality index for the specified location.",
            location=("string", "The location for which to get the air quality index."),
        ),
        "play_music": _tool(
            "play_music",
            "Plays music by the specified title and artist.",
            title=("string", "The title of the music to play."),
            artist=("string", "The artist of the music to play."),
        ),
        "get_weather_forecast": _tool(
            "get_weather_forecast",
            "Returns the weather forecast for the specified city and date.",
            city=city,
            date=("string", "The date for which to get the weather forecast."),
        ),
        "control_light": _tool(
            "control_light",
            "Controls the light in the specified room.",
            room=("string", "The room where the light should be controlled."),
            state=("string", 'The desired state of the light ("on" or "off").'),
        ),
        "create_reminder": _tool(
            "create_reminder",
            "Creates a reminder for the specified time and note.",
            time=("string", "The time for the reminder."),
            note=("string", "The note for the reminder."),
        ),
        "get_wind_conditions": _tool(
            "get_wind_conditions",
            "Returns the wind conditions for the specified city.",
            city=city,
            unit=("string", 'The unit of measurement for the wind speed (e.g., "mph").'),
        ),
    }
    calls = [  # user, tool, arguments, tool output, answer, tools offered
        (
            "Set a timer for 10 minutes.",
            "start_timer",
            {"duration": 600},
            "600",
            "Timer set for 10 minutes.",
            ["start_timer", "create_reminder"],
        ),
        (
            "What time is it in Tokyo?",
            "get_current_time",
            {"location": "Tokyo"},
            "06:22:48",
            "The current time in Tokyo is 06:22 AM.",
            ["get_current_time"],
        ),
        (
            "Is the air clean today in Lisbon?",
            "get_air_quality_index",
            {"location": "Lisbon, Portugal"},
            "53",
            "The air quality is moderate.",
            ["get_air_quality_index", "get_weather_forecast", "get_wind_conditions"],
        ),
        (
            "Play some music.",
            "play_music",
            {"title": "Take Five", "artist": "Dave Brubeck"},
            "{'status': 'Playing'}",
            "Enjoy the jazz tunes!",
            ["play_music", "control_light"],
        ),
        (
            "What's the weather like tomorrow in Berlin?",
            "get_weather_forecast",
            {"city": "Berlin", "date": "2025-06-16"},
            "{'temperature': 22, 'condition': 'partly cloudy'}",
            "Tomorrow in Berlin will be partly cloudy with a high of 22°C.",
            ["get_weather_forecast", "get_wind_conditions"],
        ),
        (
            "Turn on the living room lights.",
            "control_light",
            {"room": "living room", "state": "on"},
            "{'state': 'on'}",
            "The living room lights are now on.",
            ["control_light"],
        ),
        (
            "Remind me to call mom at 7 PM.",
            "create_reminder",
            {"time": "19:00", "note": "Call mom"},
            "Reminder set",
            "Okay, I'll remind you to call mom at 7 PM.",
            ["start_timer", "create_reminder"],
        ),
        (
            "How strong is the wind in Chicago right now?",
            "get_wind_conditions",
            {"city": "Chicago", "unit": "mph"},
            "(14, 'NW')",
            "The wind in Chicago is blowing at 14 mph from the northwest.",
            ["get_weather_forecast", "get_wind_conditions"],
        ),
    ]
    messages, offered = [], []
    for user, name, arguments, output, answer, names in calls:
        call = {"type": "function", "function": {"name": name, "arguments": arguments}}
        messages.append(
            [
                {"role": "user", "content": user},
                {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "name": name, "content": output},
                {"role": "assistant", "content": answer},
            ]
        )
        # Stored as a JSON string, as on the Hub (the test json.loads() it)
        offered.append(json.dumps([tools[n] for n in names]))
    return {"messages": messages, "tools": offered}


def _image(seed: int):
    from PIL import Image

    return Image.new(
        "RGB", (16, 16), color=((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)
    )


def dataset_configs() -> dict[str, dict[str, dict]]:
    """``{repo: {config: columns}}`` for every dataset the tests load."""
    user = [[{"role": "user", "content": q}] for q, _ in ZEN_QA]
    assistant = [[{"role": "assistant", "content": a}] for _, a in ZEN_QA]
    thinking = [f"Recall the Zen of Python: {a}" for _, a in ZEN_QA]
    kwargs = [
        {"reasoning_effort": ["low", "medium", "high"][i % 3], "model_identity": HARMONY_IDENTITY}
        for i in range(len(ZEN_QA))
    ]
    harmony_assistant = [
        [{"role": "assistant", "thinking": t, "content": a}]
        for t, (_, a) in zip(thinking, ZEN_QA, strict=True)
    ]

    def image_turn(q: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]

    def text_turn(a: str) -> list[dict]:
        return [{"role": "assistant", "content": [{"type": "text", "text": a}]}]

    return {
        "zen": {
            "standard_language_modeling": {"text": [p + c for p, c, _ in ZEN]},
            "standard_prompt_completion": {
                "prompt": [p for p, _, _ in ZEN],
                "completion": [c for _, c, _ in ZEN],
            },
            "standard_implicit_prompt_preference": {
                "chosen": [p + c for p, c, _ in ZEN],
                "rejected": [p + r for p, _, r in ZEN],
            },
            "conversational_language_modeling": {
                "messages": [u + a for u, a in zip(user, assistant, strict=True)],
            },
            "conversational_prompt_completion": {"prompt": user, "completion": assistant},
        },
        "harmony": {
            "language_modeling": {
                "messages": [u + a for u, a in zip(user, harmony_assistant, strict=True)],
                "chat_template_kwargs": kwargs,
            },
            "prompt_completion": {
                "prompt": user,
                "completion": harmony_assistant,
                "chat_template_kwargs": kwargs,
            },
        },
        "toolcall": {"language_modeling": _toolcall_rows()},
        "zen-image": {
            "conversational_language_modeling": {
                "images": [[_image(i)] for i in range(len(ZEN_QA))],
                "messages": [image_turn(q) + text_turn(a) for q, a in ZEN_QA],
            },
            "conversational_prompt_completion": {
                "images": [[_image(i)] for i in range(len(ZEN_QA))],
                "prompt": [image_turn(q) for q, _ in ZEN_QA],
                "completion": [text_turn(a) for _, a in ZEN_QA],
            },
        },
        "zen-multi-image": {
            "conversational_prompt_completion": {
                "images": [[_image(i), _image(i + 1)][: 1 + i % 2] for i in range(len(ZEN_QA))],
                "prompt": [
                    [
                        {
                            "role": "user",
                            "content": [{"type": "image"}] * (1 + i % 2)
                            + [{"type": "text", "text": q}],
                        }
                    ]
                    for i, (q, _) in enumerate(ZEN_QA)
                ],
                "completion": [text_turn(a) for _, a in ZEN_QA],
            },
        },
    }


def build_datasets(root: Path) -> None:
    from datasets import Dataset

    for repo, configs in dataset_configs().items():
        folder = root / ORG / repo
        shutil.rmtree(folder, ignore_errors=True)
        lines = ["---", "configs:"]
        for config, columns in configs.items():
            dataset = Dataset.from_dict(columns, on_mixed_types="use_json")
            splits = dataset.train_test_split(test_size=0.1, shuffle=False)
            (folder / config).mkdir(parents=True)
            lines += [f"- config_name: {config}", "  data_files:"]
            for split, part in splits.items():
                part.to_parquet(str(folder / config / f"{split}-00000-of-00001.parquet"))
                lines += [f"  - split: {split}", f"    path: {config}/{split}-*.parquet"]
        (folder / "README.md").write_text(
            "\n".join([*lines, "---", f"Stand-in for {ORG}/{repo}.", ""])
        )
        print(f"dataset {ORG}/{repo}: {', '.join(configs)}")


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------

QWEN2_5_SPECIALS = [  # ids 151643.. in Qwen2.5's tokenizer
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
QWEN3_SPECIALS = [*QWEN2_5_SPECIALS, "<tool_response>", "</tool_response>", "<think>", "</think>"]
R1_DISTILL_SPECIALS = [  # ids 151643.. in DeepSeek-R1-Distill-Qwen's tokenizer
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜begin▁of▁sentence｜>",
    "<|EOT|>",
    "<think>",
    "</think>",
]
QWEN_FIRST_SPECIAL_ID = 151643
# Added tokens that are text, not control tokens (kept by decode(skip_special_tokens=True))
NOT_SPECIAL = {
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
}
TEMPLATE_TOKEN = re.compile(
    r"<\|[A-Za-z0-9_]+\|>|<｜[^｜]+｜>|\[gMASK\]|<sop>|</?think>|</?tool_call>|</?tool_response>"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

_BPE_CACHE: dict[str, object] = {}


def _corpus() -> list[str]:
    texts = [p + c for p, c, _ in ZEN] + [p + r for p, _, r in ZEN]
    texts += [q for q, _ in ZEN_QA] + [a for _, a in ZEN_QA]
    texts += [json.dumps(row) for row in _toolcall_rows()["messages"]] + _toolcall_rows()["tools"]
    texts += [
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        HARMONY_IDENTITY,
        "system user assistant tool developer Reasoning: low medium high",
        "Recall the Zen of Python: ### Question: ### Answer: ### Chosen: ### Rejected:",
    ]
    return texts


def _trained_bpe():
    """Byte-level BPE (workload_tokenizer's pipeline) with merges trained on the stand-in data."""
    if "bpe" not in _BPE_CACHE:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=3000,
            min_frequency=1,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(_corpus() * 2, trainer)
        _BPE_CACHE["bpe"] = json.loads(tok.to_str())
    return _BPE_CACHE["bpe"]


def make_tokenizer(
    specials: list[str],
    *,
    eos: str,
    bos: str | None = None,
    pad: str | None = None,
    unk: str | None = None,
    chat_template: str | None = None,
    first_special_id: int | None = None,
):
    """A fast tokenizer whose added tokens are ``specials`` (plus bos/eos/pad/unk and the tokens
    the chat template spells out), numbered from ``first_special_id`` when given (the gap is
    filled with unreachable placeholder tokens)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(json.dumps(_trained_bpe()))
    vocab = spec["model"]["vocab"]
    if first_special_id is not None:
        for i in range(len(vocab), first_special_id):
            vocab[f"<|placeholder_{i}|>"] = i
    tok = Tokenizer.from_str(json.dumps(spec))
    wanted = list(specials)
    for token in [bos, eos, pad, unk, *TEMPLATE_TOKEN.findall(chat_template or "")]:
        if token is not None and token not in wanted:
            wanted.append(token)
    tok.add_special_tokens(
        [AddedToken(t, special=t not in NOT_SPECIAL, normalized=False) for t in wanted]
    )
    if first_special_id is not None:
        assert tok.token_to_id(wanted[0]) == first_special_id, "special token ids are off"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=131072,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def trl_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(
        encoding="utf-8"
    )


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

SMALL = {
    "hidden_size": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 32,
}
MOE = {"moe_intermediate_size": 16, "num_experts_per_tok": 2}


def model_specs() -> dict[str, dict]:
    """``{repo_id: spec}``: architecture (``model_type``), config overrides and tokenizer."""
    qwen2_5 = {
        "specials": QWEN2_5_SPECIALS,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "chat_template": trl_template("qwen2_5"),
        "first_special_id": QWEN_FIRST_SPECIAL_ID,
    }
    qwen3 = {**qwen2_5, "specials": QWEN3_SPECIALS, "chat_template": trl_template("qwen3")}
    qwen_generation = {
        "bos_token_id": 151643,
        "eos_token_id": [151645, 151643],
        "pad_token_id": 151643,
    }
    specs = {
        f"{ORG}/tiny-Qwen2ForCausalLM-2.5": {
            "model_type": "qwen2",
            "config": {**SMALL, "vocab_size": 152064},
            "tokenizer": qwen2_5,
            "generation": qwen_generation,
        },
        f"{ORG}/tiny-Qwen2ForCausalLM-R1-Distill": {
            "model_type": "qwen2",
            "config": {**SMALL, "vocab_size": 152064},
            "tokenizer": {
                "specials": R1_DISTILL_SPECIALS,
                "bos": "<｜begin▁of▁sentence｜>",
                "eos": "<｜end▁of▁sentence｜>",
                "pad": "<｜end▁of▁sentence｜>",
                "chat_template": trl_template("deepseek_r1_distill"),
                "first_special_id": QWEN_FIRST_SPECIAL_ID,
            },
        },
        f"{ORG}/tiny-Qwen3ForCausalLM": {
            "model_type": "qwen3",
            "config": {**SMALL, "head_dim": 8, "vocab_size": 151936},
            "tokenizer": qwen3,
            "generation": qwen_generation,
        },
        f"{ORG}/tiny-Qwen3MoeForCausalLM": {
            "model_type": "qwen3_moe",
            "config": {
                **SMALL,
                **MOE,
                "head_dim": 8,
                "num_local_experts": 4,
                "num_experts": 4,
                "vocab_size": 151936,
            },
            "tokenizer": qwen3,
            "generation": qwen_generation,
        },
        f"{ORG}/tiny-DeepseekV3ForCausalLM": {
            "model_type": "deepseek_v3",
            "config": {
                **SMALL,
                **MOE,
                "num_key_value_heads": 4,
                "n_routed_experts": 4,
                "n_shared_experts": 1,
                "n_group": 1,
                "topk_group": 1,
                "first_k_dense_replace": 1,
                "kv_lora_rank": 8,
                "q_lora_rank": 8,
                "qk_rope_head_dim": 4,
                "qk_nope_head_dim": 4,
                "v_head_dim": 4,
                "num_nextn_predict_layers": 0,
            },
            "tokenizer": {
                "specials": [],
                "bos": "<｜begin▁of▁sentence｜>",
                "eos": "<｜end▁of▁sentence｜>",
                "pad": "<｜end▁of▁sentence｜>",
                "chat_template": trl_template("deepseekv3"),
            },
        },
        f"{ORG}/tiny-GptOssForCausalLM": {
            "model_type": "gpt_oss",
            "config": {
                **SMALL,
                "head_dim": 8,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "sliding_window": 16,
            },
            "tokenizer": {
                "specials": ["<|startoftext|>", "<|endoftext|>"],
                "bos": "<|startoftext|>",
                "eos": "<|return|>",
                "pad": "<|endoftext|>",
                "chat_template": trl_template("gptoss"),
            },
        },
        f"{ORG}/tiny-Cohere2ForCausalLM": {
            "model_type": "cohere2",
            "config": {**SMALL, "hidden_size": 16, "head_dim": 4, "sliding_window": 16},
            "tokenizer": {
                "specials": ["<PAD>", "<UNK>", "<BOS_TOKEN>"],
                "bos": "<BOS_TOKEN>",
                "eos": "<|END_OF_TURN_TOKEN|>",
                "pad": "<PAD>",
                "unk": "<UNK>",
                "chat_template": trl_template("cohere2"),
            },
        },
        f"{ORG}/tiny-FalconMambaForCausalLM": {
            "model_type": "falcon_mamba",
            "config": {
                "hidden_size": 8,
                "num_hidden_layers": 2,
                "state_size": 4,
                "expand": 2,
                "conv_kernel": 4,
                "time_step_rank": 2,
                "intermediate_size": 16,
            },
            "tokenizer": {"specials": [], "eos": "<|endoftext|>"},
        },
        f"{ORG}/tiny-Glm4MoeForCausalLM": {
            "model_type": "glm4_moe",
            "config": {
                **SMALL,
                **MOE,
                "head_dim": 8,
                "n_routed_experts": 4,
                "n_shared_experts": 1,
                "first_k_dense_replace": 1,
                "num_nextn_predict_layers": 0,
            },
            "tokenizer": {
                "specials": ["<|endoftext|>"],
                "eos": "<|endoftext|>",
                "pad": "<|endoftext|>",
                "chat_template": trl_template("glm4moe"),
            },
        },
        f"{ORG}/tiny-NemotronHForCausalLM-nano": {
            "model_type": "nemotron_h",
            "config": {
                **SMALL,
                **MOE,
                "head_dim": 8,
                "num_hidden_layers": 3,
                "layers_block_type": ["linear_attention", "moe", "full_attention"],
                "ssm_state_size": 4,
                "mamba_num_heads": 4,
                "mamba_head_dim": 4,
                "n_groups": 1,
                "chunk_size": 8,
                "n_routed_experts": 4,
                "n_shared_experts": 1,
                "moe_shared_expert_intermediate_size": 16,
                "use_mamba_kernels": False,
            },
            "tokenizer": {
                "specials": ["<unk>", "<s>", "</s>"],
                "bos": "<s>",
                "eos": "<|im_end|>",
                "unk": "<unk>",
                "chat_template": trl_template("nemotron_3_nano"),
            },
        },
        f"{ORG}/tiny-Olmo3ForCausalLM": {
            "model_type": "olmo3",
            "config": {**SMALL, "sliding_window": 16},
            "tokenizer": {
                "specials": ["<|endoftext|>", "<|pad|>"],
                "eos": "<|im_end|>",
                "pad": "<|pad|>",
                "chat_template": CHATML_TEMPLATE,
            },
        },
        f"{ORG}/tiny-Lfm2ForCausalLM": {
            "model_type": "lfm2",
            "config": {**SMALL, "layer_types": ["conv", "full_attention"], "block_multiple_of": 8},
            "tokenizer": {
                "specials": ["<|pad|>", "<|startoftext|>"],
                "bos": "<|startoftext|>",
                "eos": "<|im_end|>",
                "pad": "<|pad|>",
                "chat_template": trl_template("lfm2"),
            },
        },
        f"{ORG}/tiny-Lfm2ForCausalLM-2.5": {
            "model_type": "lfm2",
            "config": {**SMALL, "layer_types": ["conv", "full_attention"], "block_multiple_of": 8},
            "tokenizer": {
                "specials": ["<|pad|>", "<|startoftext|>"],
                "bos": "<|startoftext|>",
                "eos": "<|im_end|>",
                "pad": "<|pad|>",
                "chat_template": trl_template("lfm2_2_5"),
            },
        },
        f"{ORG}/tiny-MistralForCausalLM-0.2": {
            "model_type": "mistral",
            "config": dict(SMALL),
            # no pad token, like Mistral's: the trainer falls back to eos
            "tokenizer": {
                "specials": ["<unk>", "<s>", "</s>"],
                "bos": "<s>",
                "eos": "</s>",
                "unk": "<unk>",
                "chat_template": MISTRAL_TEMPLATE,
            },
        },
        f"{ORG}/tiny-GPTNeoXForCausalLM": {
            "model_type": "gpt_neox",
            "config": {
                "hidden_size": 16,
                "num_attention_heads": 2,
                "num_hidden_layers": 2,
                "intermediate_size": 32,
                "rotary_pct": 0.25,
            },
            # no chat template and no pad token, like the Hub one
            "tokenizer": {
                "specials": ["<|endoftext|>"],
                "bos": "<|endoftext|>",
                "eos": "<|endoftext|>",
                "unk": "<|endoftext|>",
            },
        },
        f"{ORG}/tiny-RemoteForCausalLM": {
            "model_type": "qwen2",
            "config": {**SMALL, "vocab_size": 152064},
            "tokenizer": qwen2_5,
            "remote": True,
        },
        "Qwen/Qwen3-4B": {  # only its tokenizer is used (chat_template_path="Qwen/Qwen3-4B")
            "model_type": "qwen3",
            "config": {**SMALL, "head_dim": 8, "vocab_size": 151936},
            "tokenizer": qwen3,
            "tokenizer_only": True,
        },
    }
    return specs


REMOTE_CONFIG = """from transformers import Qwen2Config


class RemoteConfig(Qwen2Config):
    model_type = "remote"
"""
REMOTE_MODELING = """from transformers import Qwen2ForCausalLM

from .configuration_remote import RemoteConfig


class RemoteForCausalLM(Qwen2ForCausalLM):
    config_class = RemoteConfig
"""


def _fake_sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _snapshot(hub: Path, repo_id: str, revision: str = "main") -> Path:
    """Create (empty) the Hub-cache snapshot of ``repo_id`` at ``revision``; returns its folder."""
    repo_dir = hub / ("models--" + repo_id.replace("/", "--"))
    sha = _fake_sha(f"{repo_id}@{revision}")
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(sha)
    folder = repo_dir / "snapshots" / sha
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def build_model(hub: Path, repo_id: str, spec: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    tokenizer = make_tokenizer(**spec["tokenizer"])
    shutil.rmtree(hub / ("models--" + repo_id.replace("/", "--")), ignore_errors=True)
    folder = _snapshot(hub, repo_id)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    overrides = {"vocab_size": -(-len(tokenizer) // 64) * 64, **ids, **spec["config"]}
    config = AutoConfig.for_model(spec["model_type"], **overrides)
    if spec.get("tokenizer_only"):
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        print(f"tokenizer {repo_id}: {len(tokenizer)} tokens")
        return
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(**{**ids, **spec.get("generation", {})})
    model.to(torch.bfloat16)  # the Hub's tiny models are stored in bfloat16
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if spec.get("remote"):
        (folder / "configuration_remote.py").write_text(REMOTE_CONFIG)
        (folder / "modeling_remote.py").write_text(REMOTE_MODELING)
        config_json = json.loads((folder / "config.json").read_text())
        config_json.update(
            model_type="remote",
            architectures=["RemoteForCausalLM"],
            auto_map={
                "AutoConfig": "configuration_remote.RemoteConfig",
                "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
            },
        )
        (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    if repo_id == f"{ORG}/tiny-Qwen2ForCausalLM-2.5":
        # The pinned revision differs from `main` only by its chat template (2558 chars vs 2507)
        pinned = _snapshot(hub, repo_id, QWEN2_5_REVISION)
        for path in folder.iterdir():
            shutil.copy2(path, pinned / path.name)
        template = tokenizer.chat_template
        padding = "{#" + " " * (2558 - len(template) - 4) + "#}"
        (pinned / "chat_template.jinja").write_text(template + padding, encoding="utf-8")
    params = sum(p.numel() for p in model.parameters())
    print(f"model {repo_id}: {spec['model_type']}, {params:,} params, {len(tokenizer)} tokens")


def check_model(repo_id: str) -> None:
    """Load the stand-in back through the Hub cache, offline, and run one training step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(
        repo_id, dtype=torch.float32, trust_remote_code=True
    )
    batch = tokenizer(["Beautiful is better than ugly."], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss), f"{repo_id}: non-finite loss"


def build(args: argparse.Namespace) -> None:
    home = Path(args.out).resolve()
    os.environ.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    hub = home / "hub"
    hub.mkdir(parents=True, exist_ok=True)
    build_datasets(home / "datasets_root")
    specs = model_specs()
    selected = [r for r in specs if not args.only or any(s in r for s in args.only)]
    for repo_id in selected:
        build_model(hub, repo_id, specs[repo_id])
    for repo_id in selected:
        if not specs[repo_id].get("tokenizer_only"):
            check_model(repo_id)
    print(f"stand-ins written under {home} (HF_HOME; run pytest from {home / 'datasets_root'})")


# ----------------------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------------------

TRL_IMPORT = re.compile(r"^from trl import SFTConfig, SFTTrainer$", re.M)


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        line = line.strip()
        if line:
            return line
    return ""


def _error_line(message: str | None, text: str | None) -> str:
    """The exception's first line; for pytest.raises/warns mismatches, plus what was raised."""
    line = _first_line(message) or _first_line(text)
    if "did not match" in line or "DID NOT" in line:
        for extra in (message or text or "").splitlines():
            extra = extra.strip()
            if extra.startswith(("Actual message:", "Emitted warnings:")):
                line += " | " + extra
    return line


def parse_junit(path: Path) -> dict[str, dict]:
    results = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        classname = case.get("classname", "").split(".")[-1]
        test_id = f"{classname}::{case.get('name')}"
        outcome, error = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                error = _error_line(child.get("message"), child.text)
            elif child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                error = _first_line(child.get("message"))
        results[test_id] = {"outcome": outcome, "error": error, "time": float(case.get("time", 0))}
    return results


def run(args: argparse.Namespace) -> None:
    tests = Path(args.tests).resolve()
    home = Path(args.hf_home).resolve()
    if not (home / "datasets_root").is_dir():
        sys.exit(f"no stand-ins under {home}: run `python bench/trl_suite.py build --out {home}`")
    work = Path(tempfile.mkdtemp(prefix=f"trl_suite_{args.target}_"))
    copy = work / "tests"
    shutil.copytree(tests, copy, ignore=shutil.ignore_patterns("__pycache__"))
    test_files = sorted(copy.glob("test_*.py"))
    if args.target == "chatsft":
        for path in test_files:
            source, count = TRL_IMPORT.subn(
                "from chatsft import SFTConfig, SFTTrainer", path.read_text()
            )
            if count != 1:
                sys.exit(f"{path.name}: expected one `from trl import SFTConfig, SFTTrainer` line")
            path.write_text(source)
    env = {
        **os.environ,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "WANDB_DISABLED": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    source = chatsft_source(args, work, env) if args.target == "chatsft" else "n/a"
    junit = work / "junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *map(str, test_files),
        "-p",
        "no:cacheprovider",
        "-q",
        "--no-header",
        "-rN",
        f"--junitxml={junit}",
        "-o",
        "junit_logging=no",
    ]
    if args.k:
        cmd += ["-k", args.k]
    cmd += args.pytest_args
    print(f"[{args.target}] {' '.join(cmd)}\n  cwd={home / 'datasets_root'}", flush=True)
    subprocess.run(cmd, cwd=home / "datasets_root", env=env, check=False)
    if not junit.exists():
        sys.exit("pytest wrote no report")
    results = parse_junit(junit)
    print_table(args.target, results)
    if args.json:
        totals = Counter(r["outcome"] for r in results.values())
        Path(args.json).write_text(
            json.dumps(
                {
                    "target": args.target,
                    "tests_dir": str(tests),
                    "versions": {**versions(), "chatsft_source": source},
                    "totals": dict(totals),
                    "tests": results,
                },
                indent=1,
            )
        )
        shutil.copy(junit, Path(args.json).with_suffix(".junit.xml"))
        print(f"wrote {args.json} (and the pytest JUnit report beside it)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def chatsft_source(args: argparse.Namespace, work: Path, env: dict[str, str]) -> str:
    """Which chatsft the tests import: the working tree (the editable install), or with
    ``--chatsft-ref`` a ``git archive`` of that commit put first on PYTHONPATH (stable while
    someone edits the tree)."""
    repo = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(repo)]
    if args.chatsft_ref:
        sha = subprocess.run(
            [*git, "rev-parse", "--short", args.chatsft_ref], capture_output=True, text=True
        )
        if sha.returncode != 0:
            sys.exit(f"--chatsft-ref {args.chatsft_ref}: {sha.stderr.strip()}")
        archive = subprocess.run([*git, "archive", sha.stdout.strip(), "src"], capture_output=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(work / "chatsft", filter="data")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(work / "chatsft" / "src"), env.get("PYTHONPATH")) if p
        )
        source = f"git {args.chatsft_ref} = {sha.stdout.strip()}"
    else:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "src"], capture_output=True, text=True
        )
        source = f"working tree at {head.stdout.strip()}" + (
            " (src modified)" if dirty.stdout else ""
        )
    where = subprocess.run(
        [sys.executable, "-c", "import chatsft; print(chatsft.__file__)"],
        env=env,
        capture_output=True,
        text=True,
    )
    print(f"chatsft: {source}, imported from {where.stdout.strip() or where.stderr[-300:]}")
    return source


def versions() -> dict[str, str]:
    """Package versions."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("trl", "chatsft", "transformers", "torch", "datasets", "peft", "accelerate"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def print_table(target: str, results: dict[str, dict]) -> None:
    width = max((len(t) for t in results), default=10)
    for test_id, r in results.items():
        print(f"{test_id:<{width}}  {r['outcome']:<7}  {r['error'][:110]}")
    totals = Counter(r["outcome"] for r in results.values())
    summary = ", ".join(f"{n} {k}" for k, n in totals.most_common())
    print(f"[{target}] {len(results)} tests: {summary}")


def compare(args: argparse.Namespace) -> None:
    trl = json.loads(Path(args.trl_json).read_text())["tests"]
    ours = json.loads(Path(args.chatsft_json).read_text())["tests"]
    passed = [t for t, r in trl.items() if r["outcome"] == "passed"]
    both = [t for t in passed if ours.get(t, {}).get("outcome") == "passed"]
    print(f"TRL passes {len(passed)} of {len(trl)}; chatsft passes {len(both)} of those")
    print("\n== pass under trl, not under chatsft")
    for t in passed:
        if t not in both:
            r = ours.get(t, {"outcome": "missing", "error": ""})
            print(f"{t}\n    {r['outcome']}: {r['error'][:200]}")
    print("\n== fail under both (trl's error)")
    for t, r in trl.items():
        if r["outcome"] in ("failed", "error") and ours.get(t, {}).get("outcome") in (
            "failed",
            "error",
        ):
            print(f"{t}\n    {r['error'][:200]}")
    print("\n== pass under chatsft, not under trl")
    for t, r in ours.items():
        if r["outcome"] == "passed" and trl.get(t, {}).get("outcome") != "passed":
            theirs = trl.get(t, {})
            print(f"{t}  (trl: {theirs.get('outcome')}: {theirs.get('error', '')[:120]})")
    skipped = [t for t, r in trl.items() if r["outcome"] in ("skipped", "xfailed")]
    print(f"\n== skipped under trl: {len(skipped)}")
    for t in skipped:
        print(f"{t}: {trl[t]['error'][:120]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="write the stand-in models and datasets")
    p.add_argument(
        "--out", default=str(DEFAULT_HOME), help="HF_HOME to write (default: %(default)s)"
    )
    p.add_argument("--only", nargs="*", help="build only the models whose id contains one of these")
    p = sub.add_parser("run", help="run the TRL tests against trl or chatsft")
    p.add_argument(
        "--tests", required=True, help="folder holding TRL's test_sft_trainer.py & helpers"
    )
    p.add_argument("--target", choices=["trl", "chatsft"], required=True)
    p.add_argument("--hf-home", default=str(DEFAULT_HOME), help="stand-ins (default: %(default)s)")
    p.add_argument("--json", help="write {test id: outcome, first error line} here")
    p.add_argument("-k", help="pytest -k expression")
    p.add_argument("--threads", type=int, default=1, help="OMP threads for torch (default: 1)")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy of the tests")
    p.add_argument(
        "--chatsft-ref",
        help="test this commit of chatsft (git archive of src/) instead of the working tree",
    )
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    p = sub.add_parser("compare", help="diff two run JSONs")
    p.add_argument("trl_json")
    p.add_argument("chatsft_json")
    args = parser.parse_args()
    {"build": build, "run": run, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()
