"""The trainer's pieces on their own, without a Trainer: staged checkpoints, the skipped-step
bookkeeping and the logged-loss correction, the dataset_kwargs check."""

from __future__ import annotations

import math
import os

import pytest
import torch

from chatsft.errors import ChatSFTError
from chatsft.train import checkpoints
from chatsft.train.metrics import loss_of_applied_steps
from chatsft.train.nonfinite import SkippedSteps
from chatsft.train.prepare import skips_preparation


def write_checkpoint(root: str, name: str) -> None:
    os.makedirs(os.path.join(root, name))
    with open(os.path.join(root, name, "trainer_state.json"), "w") as f:
        f.write("{}")


def test_a_staged_checkpoint_appears_whole_and_rotation_keeps_the_best(tmp_path):
    run_dir = str(tmp_path)
    staging = checkpoints.staging_dir(run_dir)
    for step in (1, 2):
        name = f"checkpoint-{step}"

        def save(name=name):
            assert not os.path.exists(os.path.join(run_dir, name))  # nothing visible mid-save
            write_checkpoint(staging, name)

        checkpoints.stage(save, run_dir, name, {"seed": 1}, None, should_save=True)
        best = checkpoints.publish(run_dir, name, os.path.join(staging, "checkpoint-1"), 1)
        assert best == os.path.join(run_dir, "checkpoint-1")  # moved along with its folder
        assert not os.path.exists(staging)
    assert sorted(os.listdir(run_dir)) == ["checkpoint-1", "checkpoint-2"]  # best + newest
    assert os.path.exists(os.path.join(run_dir, "checkpoint-2", checkpoints.RUN_FILE))


def test_a_failed_staged_save_leaves_nothing_and_names_the_checkpoint(tmp_path):
    def save():
        write_checkpoint(checkpoints.staging_dir(str(tmp_path)), "checkpoint-5")
        raise OSError(28, "No space left on device")

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ChatSFTError, match="no space left on the device while saving checkpoint-5"):
        checkpoints.stage(save, str(tmp_path), "checkpoint-5", None, model, should_save=True)
    assert os.listdir(tmp_path) == []


def test_skipped_steps_correct_the_logged_loss_and_stop_past_the_limit():
    said = []
    skipped = SkippedSteps(max_skipped=1, say=said.append)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for step, value in enumerate([1.0, float("nan")], start=1):
        skipped.guard.poison(torch.tensor(value))
        skipped.before_step(step, torch.tensor(value), optimizer, guarded=True)
    # The Trainer's mean over 2 steps counted the skipped one as 0: 1.0 over the applied step.
    assert skipped.logged_loss(0.5) == 1.0
    assert skipped.steps == [2] and said == ["skipped step 2: its loss is nan"]
    skipped.guard.poison(torch.tensor(float("inf")))
    skipped.before_step(3, torch.tensor(1.0), optimizer, guarded=True)
    with pytest.raises(ChatSFTError, match="the loss is inf at step 3"):
        skipped.finish()


def test_the_logged_loss_is_the_mean_over_applied_steps():
    assert loss_of_applied_steps(0.7, 4, 0) == 0.7
    assert loss_of_applied_steps(1.5, 4, 1) == 2.0
    assert math.isnan(loss_of_applied_steps(0.0, 2, 2))


def test_dataset_kwargs_other_than_skip_prepare_dataset_are_named():
    assert skips_preparation({"skip_prepare_dataset": True}) is True
    with pytest.warns(UserWarning, match=r"dataset_kwargs \['add_special_tokens'\] are not used"):
        assert skips_preparation({"add_special_tokens": False}) is False
