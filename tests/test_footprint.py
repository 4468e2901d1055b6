"""`gmbench footprint` reproduces the paper's Appendix A, Tables 5 and 6 (Eq. 10)."""

import json

import pytest

from gmbench import cli
from gmbench.errors import GmbenchError
from gmbench.footprint import floats_per_gaussian, footprint, module_footprint

PAPER_LAYOUT = "1/128->8/64->16/32->32/16->64/8->10"
KEYS = ("B", "F_i", "F_o", "N_i", "N_o", "N_p", "N_k", "K", "D", "G", "M_2D", "M_3D")

# Copied from the paper text (Appendix A), one tuple per row in the order of KEYS.
TABLE_5 = [  # N_o = 2 N_p (integrated convolution-fitting)
    (32, 1, 8, 128, 128, 64, 5, 40, 49_152, 98_384, 2.25, 3.75),
    (32, 8, 16, 64, 64, 32, 5, 640, 49_152, 99_584, 2.28, 3.80),
    (32, 16, 32, 32, 32, 16, 5, 2_560, 49_152, 103_424, 2.37, 3.95),
    (32, 32, 64, 16, 16, 8, 5, 10_240, 49_152, 118_784, 2.72, 4.53),
    (32, 64, 10, 8, 8, 4, 5, 3_200, 3_840, 14_080, 0.32, 0.54),
]
TABLE_6 = [  # N_o = F_i N_i N_k (no integrated convolution-fitting)
    (32, 1, 8, 128, 640, 64, 5, 40, 180_224, 360_528, 8.25, 13.75),
    (32, 8, 16, 64, 2_560, 32, 5, 640, 1_327_104, 2_655_488, 60.78, 101.30),
    (32, 16, 32, 32, 2_560, 16, 5, 2_560, 2_637_824, 5_280_768, 120.87, 201.45),
    (32, 32, 64, 16, 2_560, 8, 5, 10_240, 5_259_264, 10_539_008, 241.22, 402.03),
    (32, 64, 10, 8, 2_560, 4, 5, 3_200, 820_480, 1_647_360, 37.71, 62.84),
]
# Paper text after Table 6: "434,256 total 3D Gaussians, which is less than 17 megabytes"
# (Table 5) versus "a theoretical use of 781 megabytes" (Table 6).
TABLE_5_TOTAL_G = 434_256
TABLE_6_TOTAL_M_3D = 781


def _run_json(capsys, *args):
    assert cli.main(["footprint", PAPER_LAYOUT, "--batch", "32", "--kernel-gaussians", "5", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("flags", "table"), [(["--integrated"], TABLE_5), ([], TABLE_6)], ids=["table5", "table6"])
def test_json_rows_reproduce_paper_table(capsys, flags, table):
    payload = _run_json(capsys, "--dims", "3", *flags)
    assert len(payload["rows"]) == len(table)
    for row, expected in zip(payload["rows"], table):
        for key, value in zip(KEYS, expected):
            if key.startswith("M_"):
                assert round(row[key], 2) == pytest.approx(value, abs=1e-9), (key, row)
            else:
                assert row[key] == value, (key, row)


@pytest.mark.parametrize(("flags", "table"), [(["--integrated"], TABLE_5), ([], TABLE_6)], ids=["table5", "table6"])
def test_json_total_sums_the_rows(capsys, flags, table):
    total = _run_json(capsys, *flags)["total"]
    assert total["K"] == sum(row[7] for row in table)
    assert total["D"] == sum(row[8] for row in table)
    assert total["G"] == sum(row[9] for row in table)
    # Summing the rounded table entries is within rounding of the exact total.
    assert total["M_3D"] == pytest.approx(sum(row[11] for row in table), abs=0.03)
    assert total["parameters"] == total["K"] * 10


def test_totals_match_the_paper_text():
    integrated = footprint(PAPER_LAYOUT, 32, 5, integrated=True)
    assert integrated.total_G == TABLE_5_TOTAL_G
    assert integrated.total_mebibytes(3) < 17
    plain = footprint(PAPER_LAYOUT, 32, 5, integrated=False)
    assert int(plain.total_mebibytes(3)) == TABLE_6_TOTAL_M_3D


def test_plain_output_is_a_table_with_a_total(capsys):
    assert cli.main(["footprint", PAPER_LAYOUT, "--batch", "32", "--kernel-gaussians", "5", "--dims", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    assert header == list(KEYS)
    assert lines[3].split() == ["32", "8", "16", "64", "2,560", "32", "5", "640", "1,327,104", "2,655,488", "60.78", "101.30"]
    assert lines[7].split() == ["total", "16,680", "10,224,896", "20,483,152", "468.82", "781.37"]
    assert "781.37 MiB in 3D" in lines[8]


def test_other_dimensions_add_a_memory_column(capsys):
    payload = _run_json(capsys, "--dims", "4", "--integrated")
    row = payload["rows"][0]
    # 4D Gaussian: 1 weight + 4 position + 10 covariance entries = 15 floats.
    assert row["M_4D"] == pytest.approx(row["G"] * 15 * 4 / 2**20)
    assert payload["total"]["parameters"] == payload["total"]["K"] * 15


def test_floats_per_gaussian_matches_the_paper_assumption():
    assert floats_per_gaussian(2) == 6
    assert floats_per_gaussian(3) == 10


def test_eq10_for_a_hand_computed_module():
    # K = 3*4*2 = 24; N_o = 3*5*2 = 30; D = 7*(4*30 + 4*6) = 1008; G = 2*(24+1008).
    row = module_footprint(7, 3, 4, 5, 6, 2, integrated=False)
    assert (row.K, row.N_o, row.D, row.G) == (24, 30, 1008, 2064)
    # Integrated: N_o = 2 N_p, but never more than the convolution produces.
    assert module_footprint(7, 3, 4, 5, 6, 2, integrated=True).N_o == 12
    assert module_footprint(1, 1, 1, 2, 8, 1, integrated=True).N_o == 2


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["1/128->oops->10"], "entry 2 'oops'"),
        (["1/128->10", "--batch", "0"], "batch size must be >= 1"),
        (["1/128->10", "--kernel-gaussians", "0"], "kernel Gaussians must be >= 1"),
        (["1/128->10", "--dims", "0"], "--dims must be >= 1"),
    ],
)
def test_bad_arguments_are_one_line_user_errors(capsys, args, fragment):
    assert cli.main(["footprint", *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(GmbenchError):
        cli.main(["--debug", "footprint", *args])
