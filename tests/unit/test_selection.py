"""Which evaluation's weights a job keeps, and when early stopping stops, on sequences worked out by hand: the rule
is the select metric, ties to the lower validation loss (the later of equals); early stopping's min_delta counts
only for patience (as HF Trainer's threshold does). Run through the loop's own track_best with a real module."""

import json

import pytest
import torch

from jobs.recipe import parse_recipe
from jobs.checkpoints import State, selection, track_best
from jobs.evaluation import baseline, versus_baseline

BASE = "name: s\nmodel:\n  name: m\ntask: {task}\ndata:\n  train: t.jsonl\ntrain:\n  epochs: 1\n"


def kept(tmp_path, evals: list[tuple[int, dict]], task="classification", train=""):
    recipe = parse_recipe(BASE.format(task=task) + train, env={})
    state, raw = State(), torch.nn.Linear(2, 2)
    for step, figures in evals:
        if state.stopped_early:
            break
        state.step = step
        with torch.no_grad():
            raw.weight.fill_(step)  # the weights of this step, to find in best/ afterwards
        track_best(state, figures, recipe, raw, tmp_path, rank=0)
    saved = torch.load(tmp_path / "best" / "state.pt")
    assert saved["weight"][0, 0].item() == state.best_step, "best/ holds the kept step's weights"
    return state


def acc(a: float, loss: float) -> dict:
    return {"accuracy": a, "loss": loss}


def test_a_saturated_accuracy_moves_on_to_the_lowest_loss(tmp_path):
    # the report's case: accuracy 1.0 from step 20 on, loss 0.53 there and 0.08 at step 180: step 20 was shipped
    evals = [(20 * k, acc(1.0, 0.53 - 0.05 * (k - 1))) for k in range(1, 10)]
    state = kept(tmp_path, evals)
    assert state.best_step == 180 and state.best_loss == pytest.approx(0.13)
    why = selection(state, "accuracy", True, 180)["why"]
    assert why == "validation accuracy 1, the best, reached at 9 evaluations (steps 20, 40, ... 180); of those the " \
                  "lowest validation loss, 0.13"


def test_the_best_metric_wins_over_a_lower_loss_and_equals_go_to_the_later(tmp_path):
    state = kept(tmp_path, [(10, acc(0.8, 0.6)), (20, acc(0.9, 0.5)), (30, acc(0.85, 0.2)), (40, acc(0.9, 0.5))])
    assert state.best_step == 40  # 0.9 at 20 and 40 with the same loss: the later
    got = selection(state, "accuracy", True, 40)
    assert got["why"] == "validation accuracy 0.9, the best, reached at 2 evaluations (steps 20, 40); of those the " \
                         "lowest validation loss, 0.5"
    state = kept(tmp_path, [(10, acc(0.8, 0.6)), (20, acc(0.9, 0.5)), (30, acc(0.85, 0.2))])
    assert state.best_step == 20 and selection(state, "accuracy", True, 30)["why"] == \
        "the best validation accuracy, 0.9 (loss 0.5); next best 0.85 at step 30"


def test_a_lower_is_better_select_metric(tmp_path):
    evals = [(1, {"mse": 2.0, "mae": 1.0, "loss": 2.0}), (2, {"mse": 1.0, "mae": 0.9, "loss": 1.0}),
             (3, {"mse": 1.5, "mae": 0.5, "loss": 1.5})]
    assert kept(tmp_path, evals, task="regression").best_step == 2
    assert kept(tmp_path, evals, task="regression", train="  select_metric: mae\n").best_step == 3


def test_min_delta_counts_for_patience_only(tmp_path):
    """0.805 beats 0.80 (kept) but by less than 0.01 (no gain for patience); 0.80 again is not kept; 0.806 is kept and
    is the third evaluation without a gain of more than 0.01: stop there."""
    es = "  early_stopping:\n    patience: 3\n    min_delta: 0.01\n"
    state = kept(tmp_path, [(1, acc(0.80, 0.5)), (2, acc(0.805, 0.3)), (3, acc(0.80, 0.4)), (4, acc(0.806, 0.35)),
                            (5, acc(0.99, 0.1))], train=es)
    assert state.stopped_early and state.step == 4 and state.best_step == 4 and state.evals_without_improvement == 3
    state = kept(tmp_path, [(1, acc(0.80, 0.5)), (2, acc(0.85, 0.3)), (3, acc(0.80, 0.4)), (4, acc(0.81, 0.35))],
                 train=es)
    assert not state.stopped_early and state.best_step == 2, "a gain of 0.05 reset the patience"


def test_baselines_by_hand():
    # train labels 0 0 1 2 (majority 0), test 0 1 1 2: accuracy 1/4; the prior, add-one: 3/7, 2/7, 2/7
    got = baseline("classification", [0, 0, 1, 2], [0, 1, 1, 2], 3)
    want_loss = -(torch.log(torch.tensor(3 / 7)) + 3 * torch.log(torch.tensor(2 / 7))).item() / 4
    assert got["accuracy"] == 0.25 and got["majority"] == 0 and got["loss"] == pytest.approx(want_loss)
    assert got["macro_f1"] == pytest.approx((2 * 1 / (2 * 1 + 3 + 0)) / 3)  # class 0: tp 1, fp 3; 1 and 2: 0
    got = baseline("regression", [1.0, 2.0, 3.0, 6.0], [2.0, 4.0], 0)
    assert got["mean"] == 3.0 and got["mse"] == pytest.approx((1 + 1) / 2) and got["mae"] == pytest.approx(1.0)
    assert versus_baseline({"mse": 6.29}, {**got, "mse": 0.8}, "mse", False) == (
        False, "test mse 6.29 is worse than predicting the mean of train, 0.8")
    assert versus_baseline({"accuracy": 0.25}, {"what": "predicting the majority class of train", "accuracy": 0.25},
                           "accuracy", True)[1] == "test accuracy 0.25 is no better than predicting the majority " \
                                                   "class of train, 0.25"
    assert json.loads(json.dumps(got)) == got


def test_an_evaluation_that_is_not_a_number_is_never_kept(tmp_path):
    state = kept(tmp_path, [(1, acc(0.6, 0.7)), (2, acc(float("nan"), float("nan"))), (3, acc(0.7, 0.5))],
                 train="  early_stopping:\n    patience: 5\n")
    assert state.best_step == 3 and state.evals_without_improvement == 0
    state = kept(tmp_path, [(1, acc(float("nan"), float("nan"))), (2, acc(0.7, 0.5))])
    assert state.best_step == 2 and state.best == 0.7  # a NaN first evaluation does not stand as the best forever
    state = State()  # no evaluation was kept (every one NaN): the weights are the last step's, and it says so
    assert selection(state, "accuracy", True, 10)["why"] == \
        "no evaluation gave a finite validation accuracy: the weights are the last step's"
