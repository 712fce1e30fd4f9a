"""Settings: read once from the environment, validated with messages naming the variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from echolabel.settings import ConfigError, Settings
from workers.training.selection import RetrainPolicy


def test_defaults_are_the_embedded_deployment():
    settings = Settings.from_env({})
    assert settings.redis_url is None and settings.qdrant_url is None
    assert settings.encoder == "efficientnet_lite0" and settings.top_k == 10
    assert settings.qdrant_path == Path("data/qdrant")


def test_values_are_parsed():
    settings = Settings.from_env(
        {
            "LABEL_STUDIO_URL": "http://ls:8080/",
            "MODEL_DIR": "/tmp/x",
            "ECHOLABEL_IMAGE_ALLOWED_HOSTS": "A.example.org, b.example.org",
            "ECHOLABEL_MIN_SCORE": "0.6",
            "ECHOLABEL_DEVICE": "CUDA",
            "ECHOLABEL_LOG_JSON": "no",
            "QDRANT_SHARDS": "6",
            "QDRANT_REPLICATION_FACTOR": "2",
            "ECHOLABEL_REFRESH_AFTER": "25",
            "ECHOLABEL_REFRESH_INTERVAL_S": "0",
            "ECHOLABEL_PREANNOTATE_ON_IMPORT": "true",
            "ECHOLABEL_RETRAIN_HOLDOUT": "0.3",
            "ECHOLABEL_RETRAIN_JUDGE": "vote",
            "ECHOLABEL_RETRAIN_CONFIDENCE": "0.95",
        }
    )
    assert RetrainPolicy.from_settings(settings).holdout_fraction == 0.3
    assert RetrainPolicy.from_settings(settings).judge_by == "vote"
    assert RetrainPolicy.from_settings(settings).confidence == 0.95
    assert (settings.refresh_after, settings.refresh_interval_s) == (25, 0.0)
    assert settings.preannotate_on_import
    assert (settings.qdrant_shards, settings.qdrant_replication_factor) == (6, 2)
    assert settings.label_studio_url == "http://ls:8080"
    assert settings.image_allowed_hosts == ("a.example.org", "b.example.org")
    assert settings.min_score == 0.6 and settings.device == "cuda" and not settings.log_json


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LABEL_STUDIO_URL": "ls:8080"}, "LABEL_STUDIO_URL='ls:8080' is not a URL"),
        ({"REDIS_URL": "http://r"}, "scheme redis/rediss/unix"),
        ({"ECHOLABEL_TOP_K": "0"}, "ECHOLABEL_TOP_K=0 must be at least 1"),
        ({"ECHOLABEL_MIN_SCORE": "2"}, "between 0 and 1"),
        ({"ECHOLABEL_DEVICE": "tpu"}, "one of auto, cpu, cuda"),
        ({"BASIC_AUTH_USER": "u"}, "BASIC_AUTH_PASS is empty"),
        ({"ECHOLABEL_TOP_K": "2"}, "every field would abstain"),
        ({"ECHOLABEL_RETRAIN_HOLDOUT": "0"}, "ECHOLABEL_RETRAIN_HOLDOUT=0.0 must be above 0"),
        ({"ECHOLABEL_RETRAIN_HOLDOUT": "1"}, "images to train on"),
        ({"ECHOLABEL_RETRAIN_JUDGE": "head"}, "ECHOLABEL_RETRAIN_JUDGE.*label-match, vote"),
        ({"ECHOLABEL_RETRAIN_CONFIDENCE": "0.3"}, "CONFIDENCE=0.3 must be at least 0.5"),
        ({"ECHOLABEL_RETRAIN_CONFIDENCE": "1"}, "CONFIDENCE=1.0 must be at least 0.5 and below 1"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_describe_masks_secrets():
    described = Settings.from_env({"LABEL_STUDIO_API_KEY": "secret-token"}).describe()
    assert described["label_studio_api_key"] == "***"
    assert "secret-token" not in str(described)


def test_every_variable_is_documented():
    """docs/configuration.md promises every variable with its default and meaning."""
    root = Path(__file__).resolve().parents[1]
    source = (root / "echolabel" / "settings.py").read_text()
    read = set(re.findall(r'reader\.\w+\(\s*"([A-Z][A-Z0-9_]+)"', source))
    assert len(read) > 40  # the pattern still finds what Settings reads
    table = (root / "docs" / "configuration.md").read_text()
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    documented = {name for cell in first_cells for name in re.findall(r"`([A-Z0-9_]+)`", cell)}
    assert sorted(read - documented) == []
