"""Fine-tuning strategies: one registry that parameters, the network and the study all read."""

import dataclasses

import pytest

from stages.transfer_study import study_rows
from transfer.params import FinetuneParams, ParamsError, params_from_dict
from transfer.strategies import STRATEGIES, Strategy

BLOCKS = ["stem", "block1", "block2", "block3"]


def test_parameters_accept_exactly_the_registered_strategies():
    choices = next(f for f in dataclasses.fields(FinetuneParams)
                   if f.name == "strategy").metadata["choices"]
    assert choices == tuple(STRATEGIES)
    with pytest.raises(ParamsError, match="choose one of: head, last_k, full, scratch"):
        params_from_dict({"finetune": {"strategy": "last-k"}})


@pytest.mark.parametrize(("name", "k", "trained"), [
    ("head", 2, []), ("last_k", 1, ["block3"]), ("last_k", 2, ["block3", "block2"]),
    ("last_k", 9, ["block3", "block2", "block1", "stem"]), ("full", 1, BLOCKS),
    ("scratch", 1, BLOCKS)])
def test_each_strategy_chooses_its_blocks_from_the_top(name, k, trained):
    assert STRATEGIES[name].blocks_to_train(BLOCKS, k) == trained


def test_only_scratch_starts_at_random_and_must_train_batch_norm():
    assert {n for n, s in STRATEGIES.items() if not s.pretrained} == {"scratch"}
    assert {n for n, s in STRATEGIES.items() if s.needs_trained_bn} == {"scratch"}
    assert STRATEGIES["last_k"].label(3) == "last_k (k=3)"
    assert STRATEGIES["full"].label(3) == "full"


def test_a_new_strategy_is_one_class_and_one_entry(monkeypatch):
    class Middle(Strategy):
        name = "middle"
        what_trains = "the middle block"

        def blocks_to_train(self, blocks, unfreeze_k):
            return [blocks[len(blocks) // 2]]

    monkeypatch.setitem(STRATEGIES, "middle", Middle())
    assert [row.strategy for row in study_rows([1])] == [
        "scratch", "head", "last_k", "full", "middle"]
    assert study_rows([1])[-1].what_trains == "the middle block"
