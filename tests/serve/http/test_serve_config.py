"""`lorakit serve`'s options: --adapter NAME=DIR values and limits are checked before any model loads."""
from __future__ import annotations

import pytest

from lorakit import LorakitError
from lorakit.cli.main import main
from lorakit.serve.http.config import ServeConfig


def test_adapters_parse_name_equals_dir():
    assert ServeConfig(adapter=["orders=runs/a", "support = adapters/s"]).adapters() == {"orders": "runs/a",
                                                                                        "support": "adapters/s"}


@pytest.mark.parametrize("kw", [dict(adapter=["nodir"]), dict(adapter=["=x"]), dict(adapter=["a=x", "a=y"]),
                                dict(max_concurrency=0), dict(port=70000), dict(max_body_bytes=-1)])
def test_bad_options_are_refused_with_the_flag_named(kw):
    with pytest.raises(LorakitError, match="--"):
        ServeConfig(**kw)


def test_the_cli_reports_a_bad_adapter_flag_without_loading_a_model(capsys):
    assert main(["serve", "--adapter", "orders"]) == 1
    assert "NAME=DIR" in capsys.readouterr().err
