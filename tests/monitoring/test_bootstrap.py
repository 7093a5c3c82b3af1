"""`make model` builds and promotes the first model once, through the promotion gate."""

from __future__ import annotations

from common import registry
from monitoring import bootstrap


def test_bootstrap_trains_and_promotes_the_first_model_once(make_mlflow_store, reference_data, use_env, tmp_path,
                                                             capsys):
    store = make_mlflow_store()
    use_env({**store.env(), **reference_data.env(), "LATEST_DB": str(tmp_path / "requests.db"),
             "DRIFT_REFERENCE": str(tmp_path / "drift_reference.parquet"), "MODEL_NAME": "fraud-detector"})
    assert bootstrap.bootstrap() == 0
    client = store.client()
    production = registry.production_version(client, "fraud-detector")
    assert production is not None and str(production.version) == "1"
    assert str(client.get_model_version_by_alias("fraud-detector", "champion").version) == "1"
    assert (tmp_path / "drift_reference.parquet").exists()
    capsys.readouterr()

    assert bootstrap.bootstrap() == 0
    assert "v1 is in Production" in capsys.readouterr().out
    assert len(client.search_model_versions("name='fraud-detector'")) == 1


def test_bootstrap_does_nothing_when_model_uri_is_set(use_env, capsys):
    use_env({"MODEL_URI": "models:/fraud-detector@champion"})
    assert bootstrap.bootstrap() == 0
    assert "nothing to bootstrap" in capsys.readouterr().out
