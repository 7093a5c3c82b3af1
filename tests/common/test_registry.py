"""MLflow tracking setup: a block pointed at one store gives the caller back exactly what it had."""

from __future__ import annotations

import os

import mlflow
import pytest

from common import registry

BLOCK_URI = "sqlite:////tmp/inside-the-block.db"


@pytest.fixture
def no_tracking_uri(monkeypatch):
    """No URI set in code and none in the environment; the same again after the test."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    yield
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _inside_block() -> None:
    with registry.use_tracking(BLOCK_URI):
        assert mlflow.get_tracking_uri() == BLOCK_URI
        assert mlflow.get_registry_uri() == BLOCK_URI


def test_use_tracking_leaves_an_unset_uri_unset(no_tracking_uri):
    before = mlflow.get_tracking_uri()
    _inside_block()
    assert not mlflow.is_tracking_uri_set()
    assert mlflow.get_tracking_uri() == before


def test_use_tracking_leaves_the_environment_in_charge(no_tracking_uri, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a.db'}")
    _inside_block()
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'a.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'b.db'}")
    # Not pinned in code by the block: a later change of the environment still counts.
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'b.db'}"
    assert mlflow.get_registry_uri() == f"sqlite:///{tmp_path / 'b.db'}"


def test_use_tracking_restores_a_uri_set_in_code_and_the_environment_beside_it(no_tracking_uri, monkeypatch,
                                                                               tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'code.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'registry.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI")
    _inside_block()
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'code.db'}"
    assert mlflow.get_registry_uri() == f"sqlite:///{tmp_path / 'registry.db'}"
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'env.db'}"
    assert "MLFLOW_REGISTRY_URI" not in os.environ


def test_tracking_credentials_from_files_reach_mlflow_and_a_rotated_file_is_read_again(monkeypatch, tmp_path):
    from common.settings import SettingsError

    password = tmp_path / "password"
    password.write_text("first-password-0123\n")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "service")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD_FILE", str(password))
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    registry.apply_credentials()
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "first-password-0123"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "service"
    password.write_text("second-password-0123")  # rotated: the file wins over the copy in the variable
    registry.apply_credentials()
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "second-password-0123"
    password.write_text("  \n")
    with pytest.raises(SettingsError, match=r"MLFLOW_TRACKING_PASSWORD_FILE=.* is empty"):
        registry.apply_credentials()
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="cannot be read") as raised:
        registry.apply_credentials()
    assert "second-password" not in str(raised.value)
