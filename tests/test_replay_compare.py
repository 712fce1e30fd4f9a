"""`bench.replay_compare` pools replayed sessions and pairs them by order (hand-computed)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.replay_compare import main


def report(path: Path, rates: dict[int, tuple[float, float]]) -> Path:
    """A report whose sessions (by seed) reach 200 labels at the right rate given, after one
    point at 100; frozen 0.5 throughout; the leave-one-out vote right on 0.6 of 10."""

    def measures(rate: float) -> dict:
        return {"finding": {"right_rate": rate, "accuracy": rate, "coverage": 1.0, "voted": 1}}

    sessions = [
        {
            "seed": seed,
            "order": "random",
            "rounds": [],
            "points": [
                {
                    "labelled": 100,
                    "promotions": 0,
                    "fields": measures(r100),
                    "frozen": measures(0.5),
                },
                {
                    "labelled": 200,
                    "promotions": 1,
                    "fields": measures(r200),
                    "frozen": measures(0.5),
                },
            ],
        }
        for seed, (r100, r200) in rates.items()
    ]
    vote = {"queries": 10, "voted": 8, "accuracy": 0.75}
    encoder = {
        "fields": {"finding": {"vote": vote}},
        "learning_curve_retraining": {"sessions": sessions},
    }
    path.write_text(json.dumps({"encoders": {"lite0": encoder}}))
    return path


def test_pairs_orders_both_sides_replayed_and_counts_the_bar(tmp_path, capsys):
    before = report(tmp_path / "before.json", {0: (0.5, 0.50), 1: (0.5, 0.70), 2: (0.5, 0.65)})
    after = report(tmp_path / "after.json", {0: (0.6, 0.62), 1: (0.6, 0.68), 3: (0.6, 0.90)})
    assert main(["--field", "finding", "--before", str(before), "--after", str(after)]) == 0
    out = capsys.readouterr().out
    # After: three orders; at 200 labels (0.62 + 0.68 + 0.90) / 3 = 0.733, all promoted.
    assert "| 200 | 3 | 0.733 | 0.733 | 1.000 | 0.500 | 0.500 | 1.000 | 3 |" in out
    assert "| 100 | 3 | 0.600 |" in out
    # Paired: orders 0 and 1 only. Differences +0.12 and -0.02: mean +0.05, SE 0.07.
    assert "2 orders (finding): before 0.600, after 0.650, difference +0.050 +- 0.070" in out
    assert "better on 1, worse on 1" in out
    # The bar: 0.75 x 8 / 10 = 0.6, reached by 0.70 before and 0.62, 0.68 after.
    assert "bar 0.600 (frozen, every label, leave-one-out): reached by 1 before, 2 after" in out
    assert "order: 0 0.500→0.620, 1 0.700→0.680" in out
