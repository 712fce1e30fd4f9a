"""The benchmark suite runs end to end on tiny sizes and writes results that parse.

No timing is asserted: speed claims are the suite's printed numbers, not tests.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib

import pytest

from bench import EXTRA_MODULES, profiles, suite
from bench.report import Table, format_value
from echolabel.cli import main
from tests.helpers import ROOT, TINY_ENCODER, png_bytes

SECTIONS = ("search", "latency", "embedding", "memory", "embedded")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every section, once, on a tiny profile and a folder of eight small PNGs."""
    root = tmp_path_factory.mktemp("bench")
    images = root / "images"
    images.mkdir()
    for i in range(8):
        (images / f"img_{i}.png").write_bytes(png_bytes((30 * i,) * 3, size=(48, 40), pattern=i))
    tiny = profiles.Profile(
        name="tiny",
        search=profiles.SearchProfile(
            synthetic=((16, (300, 600)),),
            queries=8,
            batch=4,
            build_repeats=1,
            cell_budget_s=30.0,
            query_budget_s=0.5,
        ),
        latency=profiles.LatencyProfile(
            sizes=(200,),
            clients=(1, 2),
            stored_requests=6,
            embedded_requests=0,
            dim=16,
            profile_calls=5,
        ),
        embedding=profiles.EmbeddingProfile(
            encoders=(TINY_ENCODER, "no-such-encoder"),
            batch_sizes=(1, 2),
            images=2,
            repeats=1,
            decode_images=2,
            matmul_size=64,
        ),
        memory=profiles.MemoryProfile(points=200, dim=1280, requests=1),
        embedded=profiles.EmbeddedProfile(
            sizes=(200,), large=400, baseline_upserts=50, requests=8, dim=16
        ),
        images_dir=images,
    )
    written = suite.run(tiny, SECTIONS, root / "out", command="pytest", log=lambda _: None)
    assert set(written) == set(SECTIONS)
    return {name: json.loads(path.read_text()) for name, path in written.items()}


def rows(document: dict, title_start: str) -> list[dict]:
    table = next(t for t in document["tables"] if t["title"].startswith(title_start))
    return table["rows"]


@pytest.mark.parametrize("section", SECTIONS)
def test_each_section_writes_json_and_markdown_with_machine_and_date(results, section):
    document = results[section]
    assert document["section"] == section and document["mode"] == "tiny"
    assert document["date"] and document["command"] == "pytest"
    assert document["machine"]["logical_cores"] >= 1
    for table in document["tables"]:
        keys = [key for key, _ in table["columns"]]
        assert all(set(row) >= {k for k in keys if k in row} for row in table["rows"])


def test_markdown_tables_have_one_cell_per_column(results):
    for section, document in results.items():
        for raw in document["tables"]:
            table = Table(raw["title"], [tuple(c) for c in raw["columns"]], raw["rows"])
            lines = [line for line in table.markdown().splitlines() if line.startswith("|")]
            widths = {line.count("|") for line in lines}
            assert widths == {len(raw["columns"]) + 1}, (section, raw["title"])


def test_search_compares_every_structure_with_recall_and_ratios(results):
    document = results["search"]
    measured = rows(document, "Top-10 search")
    names = {r["structure"] for r in measured}
    assert {"matmul", "kdtree", "balltree", "hnswlib", "qdrant_local", "qdrant_edge"} <= names
    assert {"qdrant_local+filter", "qdrant_edge exact"} <= names
    for row in measured:
        assert 0.0 <= row["recall_at_k"] <= 1.0
        assert row["query_p50_ms"] <= row["query_p95_ms"]
        assert row["query_x"] is not None and row["build_s"] >= 0
    exact = [r for r in measured if r["structure"] in ("matmul", "kdtree", "balltree")]
    assert all(r["recall_at_k"] == 1.0 for r in exact)
    assert {c["structure"] for c in document["findings"]["crossovers"]} >= {"hnswlib", "kdtree"}
    assert document["findings"]["read_bandwidth_gb_s"] > 0
    # The paper's sizes were not run: each missing comparison says so.
    paper = next(t for t in document["tables"] if t["title"].startswith("Takacs"))
    assert paper["rows"] == [] and all("not measured" in note for note in paper["notes"])


def test_latency_reports_percentiles_per_client_count_and_a_profile(results):
    document = results["latency"]
    measured = rows(document, "/predict")
    assert {(r["case"], r["clients"]) for r in measured} == {
        (case, clients)
        for case in ("GET /health (HTTP floor)", "vector stored")
        for clients in (1, 2)
    }
    for row in measured:
        assert row["latency_p50_ms"] <= row["latency_p95_ms"] <= row["latency_p99_ms"]
        assert row["requests"] == 6
    table = next(t for t in document["tables"] if t["title"].startswith("/predict"))
    assert any("embedding included" in note for note in table["notes"])
    profiled = document["findings"]["profile"]
    assert profiled["calls"] == 5 and profiled["predict_wall_ms"] > 0
    assert any("(predict)" in r["function"] for r in profiled["top_cumulative"])


def test_embedding_skips_unknown_encoders_and_times_every_batch_size(results):
    document = results["embedding"]
    measured = rows(document, "Embedding throughput")
    assert {(r["encoder"], r["batch"]) for r in measured} == {(TINY_ENCODER, 1), (TINY_ENCODER, 2)}
    table = next(t for t in document["tables"] if t["title"].startswith("Embedding"))
    assert any("no-such-encoder" in note for note in table["notes"])
    assert document["findings"]["peak_gflop_s"] > 0
    decode = rows(document, "Decode and resize")
    assert {"PNG decode", "JPEG draft decode"} <= {r["path"] for r in decode}


def test_memory_reports_bytes_per_point_against_the_raw_vector(results):
    document = results["memory"]
    measured = {r["what"]: r for r in rows(document, "Memory per stored point")}
    disk = measured["qdrant-client local mode on disk (MODEL_DIR/qdrant)"]
    assert disk["bytes_per_point"] > 1280 * 4 and disk["vs_raw_x"] > 1
    assert document["findings"]["backend_peak_rss"] > 0


def test_format_value_marks_ratios_and_recall():
    assert format_value("query_x", 7.123) == "7.12×"
    assert format_value("recall_at_k", 0.98765) == "0.988"
    assert format_value("n", 100000) == "100,000"
    assert format_value("build_s", None) == "–"


def test_cli_refuses_an_unknown_section(capsys):
    assert main(["bench", "--smoke", "--only", "search,nope"]) == 1
    assert "unknown bench section(s) nope" in capsys.readouterr().err


def test_cli_sets_the_embedded_sections_large_size(monkeypatch):
    from bench import suite

    seen = {}
    monkeypatch.setattr(
        suite,
        "run",
        lambda profile, sections, out, command: seen.update(profile=profile, sections=sections),
    )
    assert main(["bench", "--only", "embedded", "--embedded-large", "5000"]) == 0
    assert seen["sections"] == ["embedded"] and seen["profile"].embedded.large == 5000
    assert seen["profile"].embedded.sizes == profiles.full().embedded.sizes
    assert main(["bench", "--only", "embedded"]) == 0
    assert seen["profile"].embedded.large == profiles.full().embedded.large


@pytest.mark.parametrize("module", ["hnswlib", "sklearn", "psutil"])
def test_bench_without_its_extra_says_which_extra_to_install(module, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if absent
    assert main(["bench", "--smoke", "--only", "search"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"echolabel: bench needs {module}")
    assert 'pip install -e ".[bench]"' in err and "Traceback" not in err


def test_bench_reraises_a_missing_module_outside_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bench.suite", None)
    with pytest.raises(ModuleNotFoundError, match=r"bench\.suite"):
        main(["bench", "--smoke", "--only", "search"])


def test_bench_extra_names_the_packages_of_pyprojects_bench_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    packages = {re.split(r"[<>=!~ \[]", spec)[0] for spec in extras["bench"]}
    assert set(EXTRA_MODULES.values()) == packages


def test_embedded_compares_edge_with_the_store_before_it_and_restarts_edge(results):
    document = results["embedded"]
    served = rows(document, "The embedded store through the app")
    assert [(r["store"], r["n"]) for r in served] == [
        ("before: local mode + matmul cache", 200),
        ("Qdrant Edge (default threshold)", 200),
        ("Qdrant Edge (default threshold), concurrent searches not merged", 200),
        ("Qdrant Edge, HNSW (threshold 0)", 200),
        ("Qdrant Edge (default threshold)", 400),
    ]
    for row in served:
        assert row["predict_vs_health_x"] > 0 and row["clients_8_vs_1_x"] > 0
        assert (row["recall_at_k"] is None) == row["store"].startswith("before")
        assert row["recall_at_k"] is None or 0.0 <= row["recall_at_k"] <= 1.0
        # Timed inside the server: the prediction is part of /predict's own time in the app.
        assert 0 < row["predict_call_ms"] < row["predict_app_ms"]
        assert row["health_app_ms"] > 0
    before, edge = rows(document, "Sustained upserts")
    assert before["points"] == 50 and before["vs_before_x"] is None
    assert edge["points"] == 400 and edge["vs_before_x"] > 0
    (restarted,) = rows(document, "Qdrant Edge at the large size")
    # The restart loads the graph and the points it wrote: nothing to build, nothing to fill.
    assert restarted["index_rebuilt"] is False
    assert 0 < restarted["store_ready_s"] <= restarted["restart_to_first_answer_s"]
    assert restarted["rss_vs_raw_x"] is not None


def test_preannotate_bench_times_push_and_refresh_on_both_stores():
    from bench.preannotate import NEW_LABELS, run_size
    from bench.server import STORES

    for store in STORES:
        row = run_size(300, refreshes=1, store_kind=store)
        assert row["store"] == store
        assert row["pushed"] + row["abstained"] == row["tasks"] - row["labelled"]
        assert row["refresh_new_labels"] == NEW_LABELS and row["refresh_s_median"] > 0
        assert row["affected_per_refresh_median"] > 0
