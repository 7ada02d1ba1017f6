"""The argparse number types: what they take, and a refusal that quotes the text and names
the range allowed."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from synapse_common import cli_numbers

NOT_NUMBERS = ("", "fast", "true", "True", "yes", "1,5", "0x10", "--1")
NON_FINITE = ("nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e400", "-1e400")


def refusal(parse: object, text: str) -> str:
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        parse(text)  # type: ignore[operator]
    return str(caught.value)


def test_integer_takes_whole_numbers_within_its_bounds() -> None:
    parse = cli_numbers.integer(1, 10)
    assert [parse(t) for t in ("1", "10", " 7 ", "+3")] == [1, 10, 7, 3]
    assert type(parse("5")) is int
    assert cli_numbers.integer(0)("9" * 40) == int("9" * 40)   # no upper bound


@pytest.mark.parametrize("text", [*NOT_NUMBERS, "1.0", "1e3", *NON_FINITE])
def test_integer_refuses_what_is_not_a_whole_number(text: str) -> None:
    assert refusal(cli_numbers.integer(0, 10), text) == f"not a whole number: {text!r}"


@pytest.mark.parametrize("text", ["0", "-1", "11", "-" + "9" * 39])
def test_integer_out_of_range_names_the_range(text: str) -> None:
    assert refusal(cli_numbers.integer(1, 10), text) == (
        f"{text!r} is out of range: must be at least 1 and at most 10")


def test_a_long_text_is_quoted_cut_short() -> None:
    """A value of hundreds of digits is out of range, not an OverflowError (nor a float)."""
    for parse in (cli_numbers.integer(1, 10), cli_numbers.count()):
        assert refusal(parse, "1" + "0" * 400).startswith(
            f"'1{'0' * 39}'… (401 characters) is out of range: must be at least ")
    assert refusal(cli_numbers.number(0), "x" * 41) == (
        f"not a number: '{'x' * 40}'… (41 characters)")


def test_integer_without_a_ceiling_names_only_its_floor() -> None:
    assert refusal(cli_numbers.integer(1), "0") == "'0' is out of range: must be at least 1"


def test_number_takes_finite_numbers_within_its_bounds() -> None:
    parse = cli_numbers.number(0, 1)
    assert [parse(t) for t in ("0", "1", "0.25", "1e-3", "-0")] == [0.0, 1.0, 0.25, 0.001, 0.0]
    assert cli_numbers.number(0)("1e300") == 1e300


@pytest.mark.parametrize("text", NOT_NUMBERS)
def test_number_refuses_what_is_not_a_number(text: str) -> None:
    assert refusal(cli_numbers.number(0, 1), text) == f"not a number: {text!r}"


@pytest.mark.parametrize("text", NON_FINITE)
def test_number_refuses_nan_and_infinities_even_without_a_ceiling(text: str) -> None:
    """nan compares false with every bound, so a bare range check would let it through."""
    for parse in (cli_numbers.number(0, 1), cli_numbers.number(-1e9)):
        assert refusal(parse, text) == f"not a finite number: {text!r}"


@pytest.mark.parametrize(("low_open", "high_open", "outside", "span"), [
    (False, False, ("-0.1", "1.5"), "at least 0 and at most 1"),
    (True, False, ("0", "-0"), "more than 0 and at most 1"),
    (True, True, ("0", "1"), "more than 0 and less than 1"),
    (False, True, ("1", "2"), "at least 0 and less than 1"),
])
def test_number_open_bounds_exclude_the_bound_and_say_so(
        low_open: bool, high_open: bool, outside: tuple[str, ...], span: str) -> None:
    parse = cli_numbers.number(0, 1, low_open=low_open, high_open=high_open)
    assert parse("0.5") == 0.5
    for text in outside:
        assert refusal(parse, text) == f"{text!r} is out of range: must be {span}"


def test_bounds_are_written_as_typed() -> None:
    assert refusal(cli_numbers.number(0.5, 604800.0), "0.1") == (
        "'0.1' is out of range: must be at least 0.5 and at most 604800")
    assert refusal(cli_numbers.count(1), "0") == (
        "'0' is out of range: must be at least 1 and at most 4294967295")


def test_a_note_follows_the_range() -> None:
    parse = cli_numbers.number(0, note="1 = real time")
    assert refusal(parse, "-1") == "'-1' is out of range: must be at least 0 (1 = real time)"


def test_port_takes_0_to_65535_unless_told_otherwise() -> None:
    parse = cli_numbers.port(note="0 = any free")
    assert (parse("0"), parse("65535")) == (0, 65535)
    assert refusal(parse, "65536") == (
        "'65536' is out of range: must be at least 0 and at most 65535 (0 = any free)")
    assert refusal(parse, "http") == "not a port number: 'http'"
    assert refusal(parse, "80.0") == "not a port number: '80.0'"
    assert refusal(cli_numbers.port(1), "0") == (
        "'0' is out of range: must be at least 1 and at most 65535")


def test_seed_is_what_numpy_takes() -> None:
    assert cli_numbers.seed()(str(2**32 - 1)) == 2**32 - 1
    assert "at most 4294967295" in refusal(cli_numbers.seed(), str(2**32))


def test_argparse_names_the_option_and_exits_2() -> None:
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--share", type=cli_numbers.number(0, 1, low_open=True))
    assert parser.parse_args(["--share", "0.5"]).share == 0.5
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
        parser.parse_args(["--share", "nan"])
    assert exited.value.code == 2
    assert err.getvalue().splitlines()[-1] == (
        "tool: error: argument --share: not a finite number: 'nan'")
