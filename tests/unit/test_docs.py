"""docs/config.md documents every config key (regenerate with `braid info --knobs`)."""

from pathlib import Path

from braid.config import knob_docs


def test_config_reference_is_up_to_date():
    doc = (Path(__file__).parents[2] / "docs" / "config.md").read_text()
    assert knob_docs() in doc, "docs/config.md is stale: regenerate it from `braid info --knobs`"
