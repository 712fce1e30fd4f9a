"""The learning curve with retraining: rounds at the policy's points, judged as the backend
judges them, and the session continues on the promoted encoder's vectors only."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from workers.evaluation.retraining_curve import (
    replay_retraining,
    replay_sessions,
    retraining_table,
)
from workers.training import TrainOptions
from workers.training.selection import RetrainPolicy

N = 300
LABELS = {"finding": ["a" if i % 3 else "b" for i in range(N)]}
POLICY = RetrainPolicy(
    growth=0.25, min_per_class=10, holdout_fraction=0.25, min_holdout_per_class=3, k=5
)
SIZES = [20, 50, 100, 200]

# A tiny recipe for the replay's rounds; no floor of optimiser steps on a few dozen images.
TINY_RETRAIN_OPTIONS = ("input_size=64", "epochs=1", "min_steps=0", "views=1", "batch_size=16")


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


NOISE = unit(np.random.default_rng(1).standard_normal((N, 8)))
# What a good challenger makes: one tight cluster per class.
CLUSTERED = unit(
    np.array([[1.0, 0.0] if c == "a" else [0.0, 1.0] for c in LABELS["finding"]])
    + 0.05 * np.random.default_rng(2).standard_normal((N, 2))
)


@pytest.mark.parametrize("order", ["random", "diverse_first"])
def test_a_good_challenger_is_promoted_and_the_curve_continues_on_it(order):
    trained: list[int] = []

    def retrain(rows):
        trained.append(len(rows))
        return CLUSTERED

    curve = replay_retraining(
        NOISE, LABELS, retrain, order=order, seed=0, sizes=SIZES, policy=POLICY
    )
    rounds = curve["rounds"]
    # 20 labels: fewer than 10 of class "b" (a third) -> refused by the guard-rail.
    assert rounds[0]["labelled"] == 20 and rounds[0]["decision"] == "refused"
    promoted = [r for r in rounds if r["decision"] == "promoted"]
    assert promoted, rounds
    assert promoted[0]["comparison"]["label_match_interval"][0] > 0
    # After the first, every round is at the policy's point: 25 % more than the last decision.
    for before, after in itertools.pairwise(rounds):
        assert after["labelled"] == int(np.ceil(before["labelled"] * 1.25))
    # The held-out images were never trained on.
    judged = [r for r in rounds if r["decision"] != "refused"]
    assert trained == [r["trained_on"] for r in judged]
    assert all(r["trained_on"] + r["comparison"]["images"] == r["labelled"] for r in judged)
    points = {p["labelled"]: p for p in curve["points"]}
    assert list(points) == SIZES
    assert points[200]["promotions"] >= 1
    assert points[200]["fields"]["finding"]["accuracy"] == 1.0
    assert points[20]["fields"]["finding"]["accuracy"] < 0.8  # the noise champion


def test_a_useless_challenger_is_kept_out():
    curve = replay_retraining(
        CLUSTERED, LABELS, lambda rows: NOISE, order="random", seed=0, sizes=SIZES, policy=POLICY
    )
    decided = [r["decision"] for r in curve["rounds"] if r["decision"] != "refused"]
    assert decided and set(decided) == {"kept"}
    assert all(p["promotions"] == 0 for p in curve["points"])
    assert curve["points"][-1]["fields"]["finding"]["accuracy"] == 1.0


def test_turned_off_there_are_no_rounds():
    def retrain(rows):
        raise AssertionError("no round may train when the loop is off")

    off = RetrainPolicy(enabled=False, min_per_class=10, k=5)
    curve = replay_retraining(
        NOISE, LABELS, retrain, order="random", seed=0, sizes=SIZES, policy=off
    )
    assert curve["rounds"] == [] and [p["labelled"] for p in curve["points"]] == SIZES


def test_the_first_round_comes_where_the_backend_starts_one_not_at_the_first_point():
    """The backend's timer starts the first round at twice the guard-rail (next_round_at(0)),
    whatever the curve's points; the replay did at its first point (10 labels) before."""
    policy = dataclasses.replace(POLICY, min_per_class=20)
    curve = replay_retraining(
        NOISE,
        LABELS,
        lambda rows: CLUSTERED,
        order="random",
        seed=0,
        sizes=[10, 20, 100],
        policy=policy,
    )
    labelled = [r["labelled"] for r in curve["rounds"]]
    assert labelled[0] == policy.next_round_at(0) == 40
    assert labelled == [40, 50, 63, 79, 99]
    assert [p["labelled"] for p in curve["points"]] == [10, 20, 100]


def test_each_point_carries_the_frozen_session_on_the_same_labels():
    curve = replay_retraining(
        NOISE, LABELS, lambda rows: CLUSTERED, order="random", seed=0, sizes=SIZES, policy=POLICY
    )
    off = replay_retraining(
        NOISE,
        LABELS,
        lambda rows: CLUSTERED,
        order="random",
        seed=0,
        sizes=SIZES,
        policy=dataclasses.replace(POLICY, enabled=False),
    )
    assert [p["frozen"] for p in curve["points"]] == [p["fields"] for p in off["points"]]
    last = curve["points"][-1]
    assert last["promotions"] >= 1
    assert last["fields"]["finding"]["accuracy"] == 1.0
    assert last["frozen"]["finding"]["accuracy"] < 0.8
    table = retraining_table({"sessions": [curve]})
    assert "| random | 200 | finding | 1.000 | 1.000 | 1.000 |" in table


def test_the_seedless_diverse_first_order_is_replayed_once():
    assert replay_sessions(["random", "diverse_first"], range(3)) == [
        ("random", 0),
        ("random", 1),
        ("random", 2),
        ("diverse_first", 0),
    ]
    assert replay_sessions(["random"], []) == []
    # Its sequence indeed ignores the seed.
    sessions = [
        replay_retraining(
            NOISE,
            LABELS,
            lambda rows: CLUSTERED,
            order="diverse_first",
            seed=seed,
            sizes=SIZES,
            policy=POLICY,
        )
        for seed in (0, 1)
    ]
    assert sessions[0]["points"] == sessions[1]["points"]


def test_a_round_the_trainer_refuses_is_recorded_as_refused_and_the_session_goes_on():
    from workers.training.samples import TrainingRefused

    def retrain(rows):
        raise TrainingRefused("refusing to train: every class needs at least 10\nmore text")

    curve = replay_retraining(
        NOISE, LABELS, retrain, order="random", seed=0, sizes=SIZES, policy=POLICY
    )
    assert curve["rounds"] and {r["decision"] for r in curve["rounds"]} == {"refused"}
    assert any(
        r["reason"] == "refusing to train: every class needs at least 10" for r in curve["rounds"]
    )
    assert [p["labelled"] for p in curve["points"]] == SIZES


def test_evaluate_folder_replays_retraining_with_the_real_trainer(tmp_path, settings):
    """A small set in the suite; the full BUSI curve runs by script (docs/evaluation.md)."""
    from echolabel.folders import read_folder
    from tests.helpers import TINY_ENCODER
    from tests.test_train_encoder import folder
    from workers.evaluation.runner import RetrainingReplay, evaluate_folder
    from workers.training import TrainOptions

    root = folder(tmp_path / "data", train=40, test=5)
    items = read_folder(root, root / "labels.csv", fields=("organ",), where={"split": "train"})
    assert len(items) == 80  # the 10 test rows stay out
    replay = RetrainingReplay(
        policy=RetrainPolicy(min_per_class=15, holdout_fraction=0.25, min_holdout_per_class=3),
        options=TrainOptions(input_size=64, epochs=1, views=1, batch_size=16, min_per_class=8),
        orders=("random",),
    )
    report = evaluate_folder(
        items, ["organ"], [TINY_ENCODER], settings, root=root, min_class_size=2, retraining=replay
    )
    block = report["encoders"][TINY_ENCODER]["learning_curve_retraining"]
    (session,) = block["sessions"]
    assert [p["labelled"] for p in session["points"]] == [10, 20, 50]
    judged = [r for r in session["rounds"] if r["decision"] != "refused"]
    assert judged, session["rounds"]
    assert all(r["trained_on"] + r["comparison"]["images"] == r["labelled"] for r in judged)
    assert {r["decision"] for r in judged} <= {"promoted", "kept"}
    assert block["policy"]["min_per_class"] == 15
    # The scratch encoders never reach the project's encoders folder.
    assert not settings.encoders_dir.exists() or not any(settings.encoders_dir.iterdir())


def test_evaluate_cli_learning_curve_replays_retraining_on_the_rows_named(
    tmp_path, monkeypatch, capsys
):
    from echolabel.cli import main
    from tests.helpers import TINY_ENCODER
    from tests.test_train_encoder import folder

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("ECHOLABEL_ENCODER", TINY_ENCODER)
    monkeypatch.setenv("ECHOLABEL_MIN_PER_CLASS", "15")
    root = folder(tmp_path / "data", train=40, test=5)
    argv = ["evaluate", "--images", str(root), "--labels", str(root / "labels.csv")]
    argv += ["--field", "organ", "--where", "split=train", "--learning-curve", "1"]
    argv += ["--min-class-size", "2", "--out", str(tmp_path / "out")]
    for option in (*TINY_RETRAIN_OPTIONS, "min_per_class=8"):
        argv += ["--retrain-option", option]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"{TINY_ENCODER}, replayed with automatic retraining:" in printed
    assert "| random | 50 | organ |" in printed and "| diverse_first | 50 | organ |" in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dataset"]["items"] == 80  # --where kept the test rows out
    block = report["encoders"][TINY_ENCODER]["learning_curve_retraining"]
    assert block["options"]["epochs"] == 1 and block["policy"]["min_per_class"] == 15
    assert [s["order"] for s in block["sessions"]] == ["random", "diverse_first"]
    # Seeds can be added to an earlier run, in the orders asked for.
    added = [a.replace(str(tmp_path / "out"), str(tmp_path / "added")) for a in argv]
    added += ["--retraining-orders", "random"]
    assert main([*added, "--retraining-first-seed", "3", "--retraining-seeds", "2"]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "added" / "report.json").read_text())
    sessions = report["encoders"][TINY_ENCODER]["learning_curve_retraining"]["sessions"]
    assert [(s["order"], s["seed"]) for s in sessions] == [("random", 3), ("random", 4)]
    assert main([*argv, "--retraining-orders", "uncertain"]) != 0
    assert "--retraining-orders 'uncertain'" in capsys.readouterr().err
    assert main([*argv, "--retrain-option", "epoch=2"]) != 0
    assert "--retrain-option epoch: not a training option" in capsys.readouterr().err


def test_evaluate_cli_bounds_the_retraining_replay_at_a_number_of_labels(
    tmp_path, monkeypatch, capsys
):
    """--retraining-up-to stops the replay at the last curve point within it (a BUSI round
    costs minutes; the target is read at 200 labels)."""
    from echolabel.cli import main
    from tests.helpers import TINY_ENCODER
    from tests.test_train_encoder import folder

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("ECHOLABEL_ENCODER", TINY_ENCODER)
    monkeypatch.setenv("ECHOLABEL_MIN_PER_CLASS", "5")
    monkeypatch.setenv("ECHOLABEL_AUTO_RETRAIN", "1")  # tests/helpers.py turns it off
    root = folder(tmp_path / "data", train=40, test=5)
    argv = ["evaluate", "--images", str(root), "--labels", str(root / "labels.csv")]
    argv += ["--field", "organ", "--where", "split=train", "--learning-curve", "1"]
    argv += ["--min-class-size", "2", "--retraining-orders", "random"]
    for option in (*TINY_RETRAIN_OPTIONS, "min_per_class=3"):
        argv += ["--retrain-option", option]
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out), "--retraining-up-to", "25"]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    (session,) = report["encoders"][TINY_ENCODER]["learning_curve_retraining"]["sessions"]
    assert [p["labelled"] for p in session["points"]] == [10, 20]
    # Rounds stop with the points: none past the last one.
    assert session["rounds"]
    assert all(r["labelled"] <= 20 for r in session["rounds"])
    assert main([*argv, "--out", str(tmp_path / "none"), "--retraining-up-to", "5"]) != 0
    assert "--retraining-up-to 5: the first point is 10" in capsys.readouterr().err


def test_the_replay_trains_its_rounds_as_the_backend_does():
    """The replay's rounds get the loop's recipe (`TrainOptions.for_retraining`): every image
    for 6 epochs and at least 96 steps, ECHOLABEL_RETRAIN_OPTIONS over that key by key, the
    command line's over all."""
    from echolabel.settings import Settings
    from workers.evaluation.runner import RetrainingReplay

    loop = RetrainingReplay.from_settings(Settings(), seeds=[0]).options
    assert (loop.val_fraction, loop.epochs, loop.min_steps) == (0, 6, 96)
    settings = Settings.from_env({"ECHOLABEL_RETRAIN_OPTIONS": '{"val_fraction": 0.15}'})
    replay = RetrainingReplay.from_settings(settings, seeds=[0], options={"epochs": 4})
    assert (replay.options.val_fraction, replay.options.epochs) == (0.15, 4)
    assert replay.options == TrainOptions.for_retraining(settings, {"epochs": 4})
