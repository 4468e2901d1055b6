"""OFF parsing, including ModelNet's known defects."""

import pytest
import torch

from gmbench.data.off import parse_off, read_off
from gmbench.errors import DataError

CUBE_VERTICES = "\n".join(f"{x} {y} {z}" for x in (0, 1) for y in (0, 1) for z in (0, 1))
CUBE_FACES = "4 0 1 3 2\n4 4 6 7 5\n4 0 4 5 1\n4 2 3 7 6\n4 0 2 6 4\n4 1 5 7 3"


def test_standard_off_with_quads_is_fan_triangulated():
    vertices, faces = parse_off(f"OFF\n8 6 0\n{CUBE_VERTICES}\n{CUBE_FACES}\n")
    assert vertices.shape == (8, 3) and vertices.dtype == torch.float32
    assert faces.shape == (12, 3)
    assert faces[:2].tolist() == [[0, 1, 3], [0, 3, 2]]


def test_modelnet_header_with_counts_glued_to_off_keyword():
    vertices, faces = parse_off(f"OFF8 6 0\n{CUBE_VERTICES}\n{CUBE_FACES}\n")
    assert vertices.shape == (8, 3) and faces.shape == (12, 3)


def test_counts_on_the_header_line_comments_blank_lines_and_colours():
    text = ("OFF 4 2 0  # header\n\n# a comment line\n0 0 0\n1 0 0 # x axis\n0 1 0\n\n0 0 1 1.0 0.5\n"
            "3 0 1 2 255 0 0\n3 0 1 3\n")
    vertices, faces = parse_off(text)
    assert vertices.tolist()[3] == [0, 0, 1]
    assert faces.tolist() == [[0, 1, 2], [0, 1, 3]]


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "chair_0001.off"
    path.write_text(f"OFF\n8 6 0\n{CUBE_VERTICES}\n4 0 1 3 2\n")
    with pytest.raises(DataError, match=r"chair_0001\.off: truncated OFF file.*8 vertices and 6 faces"):
        read_off(path)


@pytest.mark.parametrize("text, message", [
    ("", "empty OFF file"),
    ("PLY\n3 1 0\n", "not an OFF file"),
    ("OFF\nthree 1 0\n", "bad OFF counts"),
    ("OFF\n3 1 0\n0 0 0\n1 0 x\n0 1 0\n3 0 1 2\n", "malformed vertex"),
    ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n", "refers to vertex 7"),
    ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n4 0 1\n", "malformed face"),
])
def test_corrupt_files_raise_clear_errors(text, message):
    with pytest.raises(DataError, match=message):
        parse_off(text, "bad.off")


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e39"])  # 1e39 overflows float32
def test_non_finite_vertex_names_the_file_and_the_vertex(tmp_path, bad):
    path = tmp_path / "desk_0007.off"
    path.write_text(f"OFF\n3 1 0\n0 0 0\n1 {bad} 0\n0 1 0\n3 0 1 2\n")
    with pytest.raises(DataError, match=r"desk_0007\.off: vertex 1 .* NaN or infinite coordinate.*re-extract"):
        read_off(path)
