"""Layout strings (`gmbench.layout.parse_layout`)."""

import pytest

from gmbench.errors import GmbenchError
from gmbench.layout import LayerSpec, LayoutError, parse_layout

PAPER_LAYOUT = "1/128->8/64->16/32->32/16->64/8->10"


def test_paper_layout_gives_one_module_per_arrow():
    layout = parse_layout(PAPER_LAYOUT)
    assert layout.layers == [
        LayerSpec(1, 128, 8, 64),
        LayerSpec(8, 64, 16, 32),
        LayerSpec(16, 32, 32, 16),
        LayerSpec(32, 16, 64, 8),
        LayerSpec(64, 8, 10, 4, is_output=True),
    ]
    assert layout.num_classes == 10
    assert layout.input_gaussians == 128
    assert layout.input_channels == 1


def test_last_module_pools_to_half_as_in_the_paper_tables_and_is_marked_output():
    last = parse_layout("2/9->7").layers[-1]
    assert (last.in_channels, last.in_gaussians, last.out_channels, last.out_gaussians) == (2, 9, 7, 4)
    assert last.is_output
    assert parse_layout("1/1->3").layers[-1].out_gaussians == 1


def test_layout_round_trips_through_str_and_ignores_whitespace():
    assert str(parse_layout(" 1/128 -> 8/64 ->10 ")) == "1/128->8/64->10"
    assert str(parse_layout(PAPER_LAYOUT)) == PAPER_LAYOUT


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty layout"),
        ("1/128", "at least an input"),
        ("1/128->8/x->10", "entry 2 '8/x'"),
        ("1/128->8/64->10/5", "last entry '10/5'"),
        ("1/0->10", "entry 1 '1/0'"),
        ("1/128->0", "last entry '0'"),
        ("1/128-->10", "entry 1 '1/128-'"),
        ("-1/128->10", "entry 1 '-1/128'"),
    ],
)
def test_malformed_layouts_name_the_offending_part(text, fragment):
    with pytest.raises(LayoutError) as info:
        parse_layout(text)
    assert fragment in str(info.value)
    assert isinstance(info.value, GmbenchError)
    assert "\n" not in str(info.value)
