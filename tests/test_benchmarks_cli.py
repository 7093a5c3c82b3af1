"""`python -m benchmarks`: names pick the benchmarks, options after one name reach that benchmark."""

import pytest

from benchmarks.__main__ import main


def test_an_unknown_benchmark_is_refused_with_the_choices(capsys):
    assert main(["nope"]) == 2
    assert "choose from" in capsys.readouterr().err


def test_options_need_exactly_one_benchmark_before_them(capsys):
    assert main(["drift", "loop", "--months", "3"]) == 2
    assert "exactly one benchmark" in capsys.readouterr().err


def test_options_after_a_name_reach_that_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["loop", "--help"])
    assert exit_.value.code == 0
    assert "--pattern-month" in capsys.readouterr().out
