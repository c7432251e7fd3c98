"""Requests and their handles: sampling parameters are checked, and a handle delivers deltas then the end."""
from __future__ import annotations

import threading

import pytest

from lorakit import LorakitError
from lorakit.serve.requests import Completion, Delta, Request, RequestHandle, SamplingParams


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("max_tokens", 1.5), ("temperature", -1),
                                         ("temperature", float("nan")), ("top_p", 1.5), ("top_k", -1),
                                         ("stop", ("",)), ("seed", -3), ("max_tokens", True)])
def test_invalid_sampling_parameters_name_the_field(field, value):
    with pytest.raises(LorakitError, match=field):
        SamplingParams(**{field: value})


def test_a_single_stop_string_becomes_a_tuple_and_greedy_is_temperature_zero():
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy


class _Thread:
    running = True

    def step(self):
        raise AssertionError("an engine thread runs the steps")


def _completion(finish, error=None):
    return Completion("id", None, "ab", [1, 2], finish, 3, 2, 0.1, 0.2, error)


def test_a_handle_streams_across_threads_then_holds_the_completion():
    handle = RequestHandle(Request("x"), [1, 2, 3], _Thread())

    def engine():
        handle.push(Delta("a", [1]))
        handle.push(Delta("b", [2], "length"), _completion("length"))

    threading.Thread(target=engine).start()
    assert [d.text for d in handle] == ["a", "b"]
    assert handle.result(timeout=5).text == "ab" and handle.done and handle.first_token_at is not None


def test_an_engine_error_is_raised_to_the_reader():
    handle = RequestHandle(Request("x"), [1], _Thread())
    handle.push(Delta("", [], "error"), _completion("error", "the adapter directory is gone"))
    with pytest.raises(LorakitError, match="directory is gone"):
        list(handle)
    with pytest.raises(LorakitError, match="directory is gone"):
        handle.result()
