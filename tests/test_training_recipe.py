"""The training recipe's options (larger backbones, test-time mirror averaging, options the CLI
leaves to the recipe) and the validation bench that chooses among them, on tiny synthetic
images."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageOps

from bench.recipe_validation import outer_split, parse_options, score_votes
from bench.recipe_validation import run as run_recipe
from echolabel import cli
from echolabel.encoders import load_encoder
from echolabel.encoders.trained import TrainedEncoder
from echolabel.encoders.trained_files import read_config
from echolabel.images import ImageFetcher
from echolabel.settings import Settings
from tests.test_train_encoder import TINY, folder, train_on_folder
from workers.training import Sample, TrainOptions, train_encoder
from workers.training.sources import folder_samples


def asymmetric(seed: int) -> Image.Image:
    """A left/right-asymmetric RGB image (a bright band on the left, noise elsewhere)."""
    pixels = np.random.default_rng(seed).integers(0, 120, (48, 48, 3), dtype=np.uint8)
    pixels[:, :12] = 250
    return Image.fromarray(pixels)


def encoder(tta_hflip: bool) -> TrainedEncoder:
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    config = {"input_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "tta_hflip": tta_hflip}
    return TrainedEncoder("trained:t-v1", model, config, weights_id="x", device="cpu", batch_size=4)


def test_mirror_averaging_embeds_an_image_and_its_mirror_alike():
    images = [asymmetric(0), asymmetric(1)]
    mirrors = [ImageOps.mirror(i) for i in images]
    averaged, plain = encoder(True), encoder(False)
    np.testing.assert_allclose(averaged.embed(images), averaged.embed(mirrors), atol=1e-5)
    # Without it the mirror is another image; with it, the mean of both views' features.
    assert float((plain.embed(images) * plain.embed(mirrors)).sum(1).min()) < 0.999
    with torch.inference_mode():
        batch = torch.stack([plain.preprocess(i) for i in images])
        both = plain.model(batch) + plain.model(batch.flip(-1))
    expected = torch.nn.functional.normalize(both, dim=1).numpy()
    np.testing.assert_allclose(averaged.embed(images), expected, atol=1e-5)
    # Encoders saved before the option existed embed the image alone.
    config = {"input_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3}
    old = TrainedEncoder("t", plain.model, config, weights_id="x", device="cpu", batch_size=4)
    assert old.tta_hflip is False


def test_trains_from_a_larger_lite_with_mirror_averaging(tmp_path, settings):
    root = folder(tmp_path / "data")
    samples, _ = folder_samples(root, root / "labels.csv", ["organ"], split_column="split")
    options = dataclasses.replace(
        TINY, start="efficientnet_lite1", freeze_blocks=4, tta_hflip=True, epochs=1
    )
    seen = []
    summary = train_on_folder(
        settings, root, samples, "lite1", options, on_progress=lambda p: seen.append(p.as_meta())
    )
    config = read_config(Path(summary["path"]))
    assert config["backbone"]["timm_model"] == "tf_efficientnet_lite1"
    assert config["backbone"]["start"] == "efficientnet_lite1" and config["tta_hflip"] is True
    # The validation images pass the frozen trunk twice: as they are and mirrored.
    cached = [m for m in seen if m["stage"] == "computing frozen features"]
    validation = summary["class_counts"]["validation"]["organ"]
    assert cached[-1]["total"] == sum(summary["class_counts"]["train"]["organ"].values()) + 2 * sum(
        validation.values()
    )
    loaded = load_encoder(summary["encoder"], encoders_dir=settings.encoders_dir)
    assert loaded.tta_hflip and loaded.input_size == 64
    image = asymmetric(3)
    np.testing.assert_allclose(
        loaded.embed([image]), loaded.embed([ImageOps.mirror(image)]), atol=1e-5
    )


def test_unknown_start_names_the_backbones_training_can_start_from(settings):
    samples = [Sample(f"a{i}", "", {"organ": "dark" if i % 2 else "bright"}) for i in range(40)]
    with pytest.raises(
        ValueError, match="one of efficientnet_lite0, efficientnet_lite1, efficientnet_lite2"
    ):
        train_encoder(
            samples,
            ["organ"],
            fetcher=ImageFetcher(settings),
            encoders_dir=settings.encoders_dir,
            name="x",
            options=dataclasses.replace(TINY, start="resnet50", min_per_class=1),
        )


def test_cli_passes_only_the_options_given_and_the_recipe_fills_the_rest(tmp_path, monkeypatch):
    import workers.training.folder

    captured = {}

    def fake_train(samples, fields, *, options, **kwargs):
        captured["options"] = options
        return {"encoder": "trained:x-v1"}

    monkeypatch.setattr(workers.training.folder, "train_encoder", fake_train)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    root = folder(tmp_path / "data")
    argv = ["train-encoder", "--images", str(root), "--labels", str(root / "labels.csv")]
    argv += ["--field", "organ", "--split-column", "split"]
    assert cli.main([*argv, "--start", "efficientnet_lite2", "--tta-hflip"]) == 0
    given = captured["options"]
    assert (given.start, given.tta_hflip) == ("efficientnet_lite2", True)
    recipe = TrainOptions()
    assert (given.input_size, given.freeze_blocks, given.hflip) == (
        recipe.input_size,
        recipe.freeze_blocks,
        recipe.hflip,
    )
    assert given.select_by == recipe.select_by
    assert cli.main([*argv, "--no-tta-hflip", "--no-hflip", "--input-size", "96"]) == 0
    given = captured["options"]
    assert (given.tta_hflip, given.hflip, given.input_size) == (False, False, 96)
    monkeypatch.setenv("ECHOLABEL_TOP_K", "7")
    assert cli.main([*argv, "--select-by", "neighbours"]) == 0
    given = captured["options"]
    assert (given.select_by, given.vote_top_k) == ("neighbours", 7)


# The validation bench.


def test_outer_split_is_stratified_disjoint_and_its_folds_cover_every_image():
    samples = [Sample(f"{c}{i}", "", {"f": c}) for c, n in (("a", 40), ("b", 21)) for i in range(n)]
    held = []
    for fold in range(4):
        train, validation = outer_split(samples, "f", 4, fold, seed=0)
        assert not {s.id for s in train} & {s.id for s in validation}
        assert len(train) + len(validation) == len(samples)
        assert sum(s.labels["f"] == "a" for s in validation) == 10
        assert sum(s.labels["f"] == "b" for s in validation) in (5, 6)
        held += [s.id for s in validation]
    assert sorted(held) == sorted(s.id for s in samples)
    assert outer_split(samples, "f", 4, 1, seed=0) == outer_split(samples, "f", 4, 1, seed=0)
    assert outer_split(samples, "f", 4, 1, seed=0) != outer_split(samples, "f", 4, 1, seed=1)
    with pytest.raises(ValueError, match=r"fold must be 0\.\.3"):
        outer_split(samples, "f", 4, 4, seed=0)


def test_parse_options_converts_to_the_fields_types():
    options = parse_options(["start=efficientnet_lite2", "input_size=260", "tta_hflip=true"])
    assert (options.start, options.input_size, options.tta_hflip) == (
        "efficientnet_lite2",
        260,
        True,
    )
    assert parse_options(["lr=0.001", "hflip=no"]).lr == 0.001
    with pytest.raises(ValueError, match="key=value"):
        parse_options(["size=3"])


def unit(*rows: tuple[float, float]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_score_votes_counts_abstentions_as_misses_and_mixes_in_the_head():
    settings = Settings(top_k=3, min_neighbours=3, min_score=0.7)
    labelled = unit((1, 0), (1, 0.1), (0, 1), (0.1, 1))
    labelled_y = ["a", "a", "b", "b"]
    # Query 1 sits on the a's: its neighbours a, a, b give a a share of 0.93.
    # Query 2 sits between: neighbours b (0.780), a (0.768), b (0.714): b's share is 0.66,
    # under 0.7, so it abstains, and the abstention is a miss.
    queries = unit((1, 0.05), (1, 1.02))
    scored = score_votes(
        labelled, labelled_y, queries, ["a", "b"], ["a", "b"], "f", settings, temperature=0.0
    )
    assert scored["accuracy"] == 0.5 and scored["coverage"] == 0.5
    assert scored["voted_accuracy"] == 1.0
    assert scored["recall"] == {"a": "1/1", "b": "0/1"} and scored["min_recall"] == 0.0
    # The head's probabilities, mixed half and half: b on query 2 reaches 0.5 × 0.66 + 0.5 ×
    # 1.0 = 0.83; a on query 1 stays above the threshold (0.5 × 0.93 + 0.5 × 0.6 = 0.77).
    head = torch.tensor([[0.6, 0.4], [0.0, 1.0]])
    mixed = score_votes(
        labelled,
        labelled_y,
        queries,
        ["a", "b"],
        ["a", "b"],
        "f",
        settings,
        head=head,
        temperature=0.0,
    )
    assert mixed["accuracy"] == 1.0 and mixed["coverage"] == 1.0
    # A head that disagrees pulls query 1 under the threshold: abstained, a miss.
    doubting = torch.tensor([[0.3, 0.7], [0.0, 1.0]])
    assert score_votes(
        labelled, labelled_y, queries, ["a", "b"], ["a", "b"], "f", settings, head=doubting
    )["recall"] == {"a": "0/1", "b": "1/1"}
    # The minimum support still applies to the mixed vote.
    strict = dataclasses.replace(settings, min_neighbours=4)
    assert (
        score_votes(labelled, labelled_y, queries, ["a", "b"], ["a", "b"], "f", strict, head=head)[
            "coverage"
        ]
        == 0.0
    )


def test_score_votes_divides_out_the_class_prior_and_leaves_out_near_duplicates():
    settings = Settings(top_k=4, min_neighbours=1, min_score=0.0)
    # Three a's at (1, 0), one b at (0, 1); the query leans to b: a 3 × 0.640 = 1.92 against
    # b 0.768 by similarity, but 1.92 / 0.75 = 2.56 against 0.768 / 0.25 = 3.07 with the
    # prior (a 3/4, b 1/4) divided out.
    labelled = unit((1, 0), (1, 0), (1, 0), (0, 1))
    query = unit((1, 1.2))
    args = (labelled, ["a", "a", "a", "b"], query, ["b"], ["a", "b"], "f", settings)
    assert score_votes(*args, temperature=0.0)["accuracy"] == 0.0
    assert score_votes(*args, temperature=0.0, prior_power=1.0)["accuracy"] == 1.0
    # Leaving out neighbours at or above 0.99 similarity: the query's twin no longer votes.
    one = Settings(top_k=1, min_neighbours=1, min_score=0.0)
    twin = (unit((1, 0), (0, 1)), ["a", "b"], unit((1, 0)), ["a"], ["a", "b"], "f", one)
    assert score_votes(*twin)["accuracy"] == 1.0
    assert score_votes(*twin, exclude_above=0.99)["accuracy"] == 0.0


def test_centring_ranks_by_the_direction_away_from_the_labelled_mean():
    one = Settings(top_k=1, min_neighbours=1, min_score=0.0)
    # a, a at (1, 0), b at (0, 1): their mean m is (2/3, 1/3). The query (1, 0.9)/|.| is nearer
    # a as given (0.743 against 0.669), but from m it points b's way: (q - m) · (a - m) =
    # -0.087, (q - m) · (b - m) = +0.173.
    labelled = unit((1, 0), (1, 0), (0, 1))
    args = (labelled, ["a", "a", "b"], unit((1, 0.9)), ["b"], ["a", "b"], "f", one)
    assert score_votes(*args)["accuracy"] == 0.0
    assert score_votes(*args, centre=True)["accuracy"] == 1.0
    # A centre from other rows: from b alone, (q - b) points a's way.
    assert score_votes(*args, centre=True, centre_on=unit((0, 1)))["accuracy"] == 0.0
    # Near-duplicates are still those of the similarity as given: a query at b itself, with
    # every neighbour at or above 0.99 left out, is voted by an a.
    at_b = (labelled, ["a", "a", "b"], unit((0, 1)), ["b"], ["a", "b"], "f", one)
    assert score_votes(*at_b, centre=True)["accuracy"] == 1.0
    assert score_votes(*at_b, centre=True, exclude_above=0.99)["accuracy"] == 0.0


def test_recipe_bench_trains_on_the_training_part_and_scores_the_rest(tmp_path):
    root = folder(tmp_path / "data", train=24, test=4)
    options = dataclasses.replace(TINY, epochs=1, min_per_class=5)
    recipe = functools.partial(
        run_recipe,
        root,
        root / "labels.csv",
        "organ",
        options,
        folds=4,
        split_seed=0,
        head_weight=0.5,
        settings=Settings(local_files_root=root),
        tag="tiny",
    )
    results = recipe(fold=0, encoders_dir=tmp_path / "encoders")
    votes = [
        "neighbours",
        "neighbours+head",
        "neighbours, weighed by s",
        "neighbours, s, prior^0.5",
        "neighbours, s, prior^1",
        "neighbours, exp(s/0.1)",
        "neighbours, exp(s/0.05)",
        "neighbours, exp(s/0.01)",
        "neighbours, centred",
        "neighbours, centred, exp(s/0.05)",
    ]
    assert [(r["tta_hflip"], r["vote"]) for r in results] == [
        (tta, vote) for tta in (False, True) for vote in votes
    ]
    assert all(r["images"] == 12 and r["train_images"] == 36 for r in results)
    # The validation part was never trained on, not even for early stopping; no test row read.
    config = read_config(Path(results[0]["encoder"]))
    trained_on = {i["id"] for i in config["training"]["images"]}
    samples, _ = folder_samples(root, root / "labels.csv", ["organ"], split_column="split")
    _, validation = outer_split(samples, "organ", 4, 0, seed=0)
    assert len(trained_on) == 36 and not trained_on & {s.id for s in validation}
    assert trained_on | {s.id for s in validation} == {s.id for s in samples}  # no test row
    assert json.dumps(results)  # one JSON line each

    # A kept encoder scored again gives the same scores; on another fold it is refused.
    kept = Path(results[0]["encoder"])
    again = recipe(fold=0, encoders_dir=tmp_path / "unused", trained=kept)
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in results]
    assert not (tmp_path / "unused").exists()
    with pytest.raises(ValueError, match="trained for fold 0 of 4, not fold 1 of 4"):
        recipe(fold=1, encoders_dir=tmp_path / "unused", trained=kept)


def test_the_table_pools_folds_by_image_counts():
    from bench.recipe_validation import summarise

    row = {"tag": "v", "tta_hflip": True, "vote": "neighbours", "train_s_per_1000": 100}
    rows = [
        {**row, "images": 10, "accuracy": 0.9, "coverage": 1.0, "recall": {"a": "4/5", "b": "5/5"}}
        | {"load_avg_before": [1.0], "load_avg_after": [2.0]},
        {
            **row,
            "images": 30,
            "accuracy": 0.5,
            "coverage": 0.5,
            "recall": {"a": "5/15", "b": "10/15"},
        }
        | {"load_avg_before": [3.0], "load_avg_after": [4.0]},
    ]
    line = summarise(rows).splitlines()[-1]
    assert line == (
        "| v | on | neighbours | 2 | 0.600 | 0.62 | a 9/20, b 15/20 | 0.45 | 100 | 2.0–3.0 |"
    )


# Choosing the epoch by the product's vote (select_by="neighbours").


def test_neighbour_vote_scores_are_the_products_vote_with_abstentions_as_misses():
    from workers.training.validation import neighbour_vote_scores

    settings = Settings(top_k=5, min_neighbours=3, min_score=0.6)
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    labelled = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(40, 6))).float(), dim=1)
    queries = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(30, 6))).float(), dim=1)
    labelled_y = torch.tensor(rng.integers(0, 3, (40, 1)))
    query_y = torch.tensor(rng.integers(0, 3, (30, 1)))
    ours = neighbour_vote_scores(
        labelled,
        labelled_y,
        queries,
        query_y,
        [classes],
        ["f"],
        top_k=settings.top_k,
        min_neighbours=settings.min_neighbours,
        min_score=settings.min_score,
    )
    bench = score_votes(
        labelled,
        [classes[int(c)] for c in labelled_y[:, 0]],
        queries,
        [classes[int(c)] for c in query_y[:, 0]],
        classes,
        "f",
        settings,
    )
    assert ours == [(bench["accuracy"], bench["coverage"])]
    assert 0 < bench["coverage"] < 1  # some queries abstained: misses, not left out

    # Per field; a field no query is labelled for has no score, an unlabelled neighbour no vote.
    labelled = unit((1, 0), (1, 0.1), (0, 1), (0.1, 1))
    labelled_y = torch.tensor([[0, 0], [0, -100], [1, 1], [1, 1]])
    queries = unit((1, 0.05), (1, 1.02))
    scored = neighbour_vote_scores(
        labelled,
        labelled_y,
        queries,
        torch.tensor([[0, -100], [1, -100]]),
        [["a", "b"], ["x", "y"]],
        ["f", "g"],
        top_k=3,
        min_neighbours=3,
        min_score=0.7,
    )
    assert scored == [(0.5, 0.5), None]  # as in the bench's test above: query 2 abstains


def scripted_validate(monkeypatch, head: list[float], neighbours: list[float]) -> list[Any]:
    """Replace the epoch loop's validation with scripted scores per epoch (constant loss), and
    record what each call was given to vote with."""
    from workers.training import fitting

    given: list[Any] = []

    def validate(model, trunk_views, y, classes, fields, device, *, labelled=None, **kwargs):
        epoch = len(given)
        given.append(labelled)
        scores = {"val_loss": 0.5, "val_accuracy": head[epoch], "val_knn_vote_accuracy": 0.5}
        if labelled is not None:
            scores |= {"val_neighbour_vote_accuracy": neighbours[epoch], "neighbour_s": 0.01}
        return {**scores, "val_fields": {}}

    monkeypatch.setattr(fitting, "validate", validate)
    return given


def train_tiny(settings, root: Path, **options: Any) -> dict[str, Any]:
    samples, _ = folder_samples(root, root / "labels.csv", ["organ"], split_column="split")
    summary = train_on_folder(
        settings, root, samples, "select", dataclasses.replace(TINY, **options)
    )
    return {**summary, "report": json.loads((Path(summary["path"]) / "report.json").read_text())}


def test_select_by_neighbours_keeps_the_epoch_the_vote_prefers_and_stops_on_it(
    tmp_path, settings, monkeypatch
):
    root = folder(tmp_path / "data")
    # The head peaks after epoch 1, the neighbours' vote after epoch 3.
    head, neighbours = [0.9, 0.5, 0.6, 0.7], [0.5, 0.6, 0.8, 0.7]
    given = scripted_validate(monkeypatch, head, neighbours)
    by_head = train_tiny(settings, root, epochs=4, patience=3)
    assert by_head["best_epoch"] == 1 and by_head["selected_by"] == "head"
    assert given == [None] * 4  # the default embeds no training image for the vote
    assert by_head["report"]["selected_by"] == {"option": "head", "score": "val_accuracy"}

    given = scripted_validate(monkeypatch, head, neighbours)
    chosen = train_tiny(settings, root, epochs=4, patience=3, select_by="neighbours")
    assert chosen["best_epoch"] == 3 and chosen["val_selection_score"] == 0.8
    report = chosen["report"]
    assert report["selected_by"] == {
        "option": "neighbours",
        "score": "val_neighbour_vote_accuracy",
    }
    assert [c["val_neighbour_vote_accuracy"] for c in report["curves"]] == neighbours
    assert report["timing_s"]["neighbours_per_epoch"] == 0.01
    # The vote's neighbours are the training images as they are (one view each) with their
    # targets.
    trained = sum(chosen["class_counts"]["train"]["organ"].values())
    views, targets = given[0]
    assert views.shape[:2] == (1, trained) and targets.shape == (trained, 1)

    # Patience counts epochs without a better vote, however the head does.
    scripted_validate(monkeypatch, [0.1, 0.2, 0.3, 0.4, 0.5], [0.9, 0.5, 0.5, 0.5, 0.5])
    stopped = train_tiny(settings, root, epochs=5, patience=2, select_by="neighbours")
    assert (stopped["epochs_run"], stopped["best_epoch"]) == (3, 1)


def test_select_by_neighbours_scores_every_epoch_by_the_vote(tmp_path, settings):
    root = folder(tmp_path / "data")
    summary = train_tiny(settings, root, epochs=2, select_by="neighbours", vote_top_k=5)
    curves = summary["report"]["curves"]
    assert all(0 <= c["val_neighbour_vote_accuracy"] <= 1 for c in curves)
    assert all(0 < c["val_neighbour_vote_coverage"] <= 1 for c in curves)
    assert all(c["neighbour_s"] >= 0 for c in curves)
    field = curves[0]["val_fields"]["organ"]
    assert field["neighbour_vote_accuracy"] == curves[0]["val_neighbour_vote_accuracy"]
    best = max(curves, key=lambda c: (c["val_neighbour_vote_accuracy"], -c["val_loss"]))
    assert summary["best_epoch"] == best["epoch"]
    assert summary["report"]["options"]["vote_top_k"] == 5
    with pytest.raises(ValueError, match="select_by must be one of head, neighbours"):
        train_tiny(settings, root, select_by="knn")
    with pytest.raises(ValueError, match="exceeds vote_top_k"):
        train_tiny(settings, root, select_by="neighbours", vote_top_k=2)


def test_training_options_take_the_products_vote_from_the_settings():
    settings = Settings(top_k=7, min_neighbours=2, min_score=0.6, min_per_class=4)
    options = TrainOptions.from_settings(settings, {"select_by": "neighbours", "vote_top_k": 9})
    assert (options.vote_top_k, options.vote_min_neighbours, options.vote_min_score) == (9, 2, 0.6)
    assert (options.select_by, options.min_per_class) == ("neighbours", 4)
    assert TrainOptions.from_settings(Settings()).select_by == TrainOptions().select_by


def test_min_steps_raises_the_epochs_of_a_small_training_set(tmp_path, settings):
    recipe = TrainOptions(epochs=6, batch_size=32, min_steps=96)
    # 494 images are 16 steps an epoch: 6 epochs already make 96; 155 images are 5 an epoch.
    assert (recipe.epochs_for(494), recipe.epochs_for(155), recipe.epochs_for(1)) == (6, 20, 96)
    assert TrainOptions(epochs=6).epochs_for(10) == 6
    root = folder(tmp_path / "data")
    summary = train_tiny(settings, root, epochs=1, min_steps=7, val_fraction=0.0)
    trained = sum(summary["report"]["class_counts"]["train"]["organ"].values())
    expected = -(-7 // -(-trained // TINY.batch_size))
    assert expected > 1
    assert summary["epochs_run"] == len(summary["report"]["curves"]) == expected
    assert summary["report"]["options"]["epochs"] == expected
    with pytest.raises(ValueError, match="min_steps must be at least 0, got -1"):
        train_tiny(settings, root, min_steps=-1)
