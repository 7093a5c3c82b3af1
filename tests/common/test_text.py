"""The shared text helpers: an error's first line, and booleans from words."""

from __future__ import annotations

import argparse

import pytest
import sqlalchemy as sa

from common.text import cli_bool, first_line, parse_bool


def test_first_line_keeps_only_the_first_line_within_the_limit():
    assert first_line(RuntimeError("disk full\nstack follows")) == "disk full"
    assert first_line(RuntimeError("x" * 500), 10) == "x" * 10


def test_first_line_names_the_type_of_an_error_without_a_message():
    assert first_line(TimeoutError()) == "TimeoutError"
    assert first_line(None) == "unknown error"


def test_first_line_prefers_the_drivers_error_to_sqlalchemys_statement_dump():
    wrapped = sa.exc.OperationalError("SELECT 1", {}, RuntimeError("database is locked"))
    assert first_line(wrapped) == "database is locked"


@pytest.mark.parametrize(("word", "value"), [("1", True), ("TRUE", True), (" yes ", True), ("on", True),
                                             ("0", False), ("false", False), ("No", False), ("off", False)])
def test_parse_bool_reads_the_usual_words(word, value):
    assert parse_bool(word) is value


def test_parse_bool_refuses_other_words_and_the_empty_word_unless_told():
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool("maybe")
    with pytest.raises(ValueError):
        parse_bool("")
    assert parse_bool("", empty=False) is False


def test_cli_bool_treats_an_unset_mlproject_parameter_as_false_and_explains_a_bad_word():
    assert cli_bool("") is False
    with pytest.raises(argparse.ArgumentTypeError, match="'sometimes' is not a boolean"):
        cli_bool("sometimes")
