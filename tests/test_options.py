"""The sampling and text rules the CLI and the server share (pcmoe.options, torch-free)."""

import math

import pytest

from pcmoe.options import MAX_STOP_STRINGS, OptionError, PcmoeError, check_sampling, check_text


@pytest.mark.parametrize("values", [
    {}, {"temperature": 0}, {"temperature": 2.0}, {"temperature": 1}, {"top_p": 1}, {"top_p": 1e-9},
    {"max_tokens": 1}, {"max_tokens": 10**6}, {"seed": -(2**63)}, {"seed": 2**64 - 1}, {"seed": 0},
    {"stop": "x"}, {"stop": []}, {"stop": ["a", "b", "c", "d"]}, {"stop": [""]},
])
def test_accepted(values):
    check_sampling(**values)


@pytest.mark.parametrize("values, param", [
    ({"temperature": -1}, "temperature"), ({"temperature": 2.01}, "temperature"),
    ({"temperature": math.nan}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"temperature": True}, "temperature"), ({"temperature": "1"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 0.0}, "top_p"), ({"top_p": 2}, "top_p"), ({"top_p": -0.5}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 1.0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"seed": 1.5}, "seed"),
    ({"stop": ["a"] * (MAX_STOP_STRINGS + 1)}, "stop"), ({"stop": [1]}, "stop"), ({"stop": 3}, "stop"),
    ({"stop": ["ok", "\ud800"]}, "stop"),
])
def test_refused_with_one_line_naming_the_value(values, param):
    with pytest.raises(OptionError) as info:
        check_sampling(**values)
    e = info.value
    assert isinstance(e, PcmoeError) and e.param == param
    assert e.message("--x").startswith("--x ") and "\n" not in str(e)


def test_message_names_the_value_as_the_caller_calls_it():
    with pytest.raises(OptionError) as info:
        check_sampling(top_p=0.0, temperature=1.0)
    assert info.value.message("--top-p") == "--top-p must be a number above 0 and at most 1 (got 0.0)"
    assert str(info.value) == "top_p must be a number above 0 and at most 1 (got 0.0)"


def test_text_rules():
    check_text("plain", "prompt")
    check_text("héllo ✓ 中文", "prompt")
    with pytest.raises(OptionError, match=r"lone UTF-16 surrogate \(U\+D800\) at character 1"):
        check_text("a\ud800", "prompt")
    # Python hands over command-line bytes that are not UTF-8 as U+DC80..U+DCFF
    arg = b"ab\xffc".decode("utf-8", "surrogateescape")
    with pytest.raises(OptionError, match="not UTF-8 text: byte 0xFF at character 2"):
        check_text(arg, "prompt", from_bytes=True)
    with pytest.raises(OptionError, match="lone UTF-16 surrogate"):
        check_text(arg, "prompt")
