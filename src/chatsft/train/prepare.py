"""A trainer's data sets made trainer-ready: TRL's dataset checks, shuffling, and the choice between
preparing a whole set up front (`data.prepare`) and preparing rows as they stream
(`ConstantLengthDataset`). Each set is prepared once; what preparation counted is kept."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import datasets
import torch

from ..config import SFTConfig
from ..data.encode import PrepOptions
from ..data.prepare import PrepStats, prepare_for_training
from ..data.streaming import ConstantLengthDataset
from .build import check_labels_present, check_no_transform, prep_options


class Recipe(NamedTuple):
    """How one kind of data set (train or eval) is prepared."""

    tokenizer: Any
    opts: PrepOptions
    kwargs: dict[str, Any]  # prepare_for_training's keyword arguments


def recipes(
    args: SFTConfig, tokenizer: Any, formatting_func: Callable | None
) -> tuple[Recipe, Recipe]:
    """(train, eval): the same preparation, except that eval_packing decides packing for eval."""
    opts = prep_options(args, tokenizer)
    kwargs = dict(
        packing=args.packing,
        packing_strategy=args.packing_strategy,
        formatting_func=formatting_func,
        num_proc=args.dataset_num_proc,
        column_map=args.column_map,
    )
    eval_packing = args.packing if args.eval_packing is None else args.eval_packing
    return Recipe(tokenizer, opts, kwargs), Recipe(
        tokenizer, opts, {**kwargs, "packing": eval_packing}
    )


def skips_preparation(dataset_kwargs: dict[str, Any] | None) -> bool:
    """TRL's dataset_kwargs: `skip_prepare_dataset` is the one key chatsft reads."""
    extra = dict(dataset_kwargs or {})
    skip = bool(extra.pop("skip_prepare_dataset", False))
    if extra:
        # stacklevel: this function, DataPrep, SFTTrainer.__init__, then the caller's line.
        warnings.warn(
            f"dataset_kwargs {sorted(extra)} are not used by chatsft; remove them", stacklevel=4
        )
    return skip


def prepare(
    dataset: Any, recipe: Recipe, name: str, args: SFTConfig
) -> tuple[Any, PrepStats | None]:
    """One raw data set, ready for a chatsft collator, and its counts (None where there are none
    yet: streamed sets count in their .stats as they run, packed sets pass as they are)."""
    check_no_transform(dataset, name)
    if name == "train" and args.shuffle_dataset and hasattr(dataset, "shuffle"):
        dataset = dataset.shuffle(seed=args.seed)  # before packing: rows mix the whole set
    if isinstance(dataset, (datasets.IterableDataset, torch.utils.data.IterableDataset)):
        if isinstance(dataset, ConstantLengthDataset):
            return dataset, None
        if recipe.kwargs.get("column_map"):
            dataset = dataset.rename_columns(recipe.kwargs["column_map"])
        # Streaming: tokenize and pack as rows arrive.
        streamed = ConstantLengthDataset(
            dataset,
            recipe.tokenizer,
            recipe.opts,
            packing=recipe.kwargs["packing"],
            packing_strategy=recipe.kwargs["packing_strategy"],
            formatting_func=recipe.kwargs["formatting_func"],
        )
        return streamed, None
    # Rank 0 prepares first and fills datasets' cache; the other ranks then read it.
    with args.main_process_first(desc=f"{name} data preparation"):
        return prepare_for_training(
            dataset, recipe.tokenizer, recipe.opts, name=name, **recipe.kwargs
        )


class DataPrep:
    """Prepares each of a trainer's data sets once (evaluate() may be given one prepared at init)
    and keeps what preparation counted, by set name."""

    def __init__(
        self,
        args: SFTConfig,
        tokenizer: Any,
        formatting_func: Callable | None,
        say: Callable[[str | None], None],
    ) -> None:
        self.args, self.say = args, say
        self.skip = skips_preparation(args.dataset_kwargs)
        self.train_recipe, self.eval_recipe = recipes(args, tokenizer, formatting_func)
        self.stats: dict[str, PrepStats] = {}
        self._prepared: list[Any] = []

    def train(self, dataset: Any) -> Any:
        if self.skip:
            check_labels_present({"train": dataset})
            return dataset
        return self._once(dataset, self.train_recipe, "train")

    def eval(self, eval_dataset: Any) -> Any:
        """A raw eval set (Dataset, IterableDataset, DatasetDict or dict of them) prepared as the
        training data is; a prepared one as it is."""
        if self.skip:
            check_labels_present({"eval": eval_dataset})
            return eval_dataset
        if isinstance(eval_dataset, dict):
            return {
                key: self._once(ds, self.eval_recipe, f"eval_{key}")
                for key, ds in eval_dataset.items()
            }
        if eval_dataset is None:
            return None
        return self._once(eval_dataset, self.eval_recipe, "eval")

    def _once(self, dataset: Any, recipe: Recipe, name: str) -> Any:
        if any(dataset is done for done in self._prepared):
            return dataset
        prepared, stats = prepare(dataset, recipe, name, self.args)
        if stats is not None:
            self.stats[name] = stats
            self.say(stats.summary(name))
        self._prepared.append(prepared)
        return prepared
