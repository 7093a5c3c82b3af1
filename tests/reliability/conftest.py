"""Fixtures for the reliability tests: the world the scenarios serve, and one shared service.

The scenarios themselves live in benchmarks/reliability.py, so that `make reliability` runs exactly
what these tests run, only heavier.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks.reliability import Service, World, serving


@pytest.fixture(scope="session")
def world(serving_registry) -> World:
    return World.of(serving_registry)


@pytest.fixture(scope="module")
def shared_service(world, tmp_path_factory) -> Iterator[Service]:
    """One gunicorn for the scenarios that only send requests (auth, hostile input, fuzzing), with
    one worker: the memory measured is that of the worker that received every hostile input."""
    with serving(world, tmp_path_factory.mktemp("shared-service"), name="shared", workers=1) as service:
        yield service
