"""chatsft's messages go through the `chatsft` logger: silenced by transformers' verbosity settings,
redirectable by users, written around progress bars."""

from __future__ import annotations

import logging
import subprocess
import sys

import datasets
import pytest
from conftest import chats, offline_env

from chatsft import SFTConfig, SFTTrainer


def test_log_level_and_handlers(tmp_path, model_dir, capsys):
    from chatsft.log import logger

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        args = dict(output_dir=str(tmp_path / "o"), max_steps=1, report_to="none")
        rows = datasets.Dataset.from_list(chats(4))
        SFTTrainer(model=model_dir, args=SFTConfig(**args), train_dataset=rows)
        assert "[chatsft] train data: 4 rows read" in capsys.readouterr().out
        assert any("train data: 4 rows read" in r.getMessage() for r in records)
        quiet = SFTConfig(**args, log_level="warning")
        SFTTrainer(model=model_dir, args=quiet, train_dataset=rows)
        assert "rows read" not in capsys.readouterr().out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.INFO)


@pytest.mark.slow
def test_transformers_verbosity_silences_chatsft_lines(tmp_path, model_dir):
    code = (
        "import datasets\nfrom chatsft import SFTConfig, SFTTrainer\n"
        f"SFTTrainer(model={model_dir!r}, args=SFTConfig(output_dir={str(tmp_path)!r}, "
        "report_to='none'), train_dataset=datasets.Dataset.from_list("
        "[{'text': 'the cat sat on a mat'}] * 4))\n"
    )
    env = {**offline_env(), "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "[chatsft]" not in done.stdout
