r"""Reading a hostile suite: the alias bound rejects a "billion laughs" file before building it.

Run:  python -m pytest benchmarks/bench_suite_yaml.py -q

``bounded``: :func:`gmbench.suite.load_yaml_with_lines` on the 9-line document of
nested aliases (9**9 = 387 million strings expanded); it counts the expanded
size on the composed node graph, each node once, and rejects the file.

``naive``: the reference defined below builds the expanded document the way a
line-keeping loader without a bound does (each alias copied), on the 6-level
version of the same file (9**6 = 531,441 strings: 1/729 of the 9-level one).

The ratio ``naive_6_levels / bounded_9_levels`` of the same run is what counts;
the bounded check must win although the naive reference gets 729 times less work.
"""

from __future__ import annotations

import time

import pytest
import yaml

from gmbench.errors import SuiteError
from gmbench.suite import load_yaml_with_lines
from gmbench.suite.yaml_lines import SuiteLoader

LEVELS = "abcdefghi"


def laughs(levels: int) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip(LEVELS, LEVELS[1:levels]):
        lines.append(f"{name}: &{name} [{','.join(['*' + previous] * 9)}]")
    return "\n".join(lines) + "\n"


def naive_build(text: str):
    """Expand every alias into its own Python objects (no bound), keeping lines as the suite reader does."""
    loader = SuiteLoader(text)
    try:
        node = loader.get_single_node()

        def build(node):
            if isinstance(node, yaml.MappingNode):
                return {loader.construct_object(k): (build(v), k.start_mark.line) for k, v in node.value}
            if isinstance(node, yaml.SequenceNode):
                return [(build(item), item.start_mark.line) for item in node.value]
            return loader.construct_object(node)

        return build(node)
    finally:
        loader.dispose()


TIMES: dict[str, float] = {}


def test_bounded_rejection_of_9_levels(benchmark):
    text = laughs(9)

    def reject():
        with pytest.raises(SuiteError, match="more than 100,000 values"):
            load_yaml_with_lines(text, "laughs.yaml")

    benchmark(reject)
    TIMES["bounded"] = benchmark.stats.stats.min


def test_naive_expansion_of_6_levels(benchmark):
    text = laughs(6)
    benchmark.pedantic(naive_build, args=(text,), rounds=3, iterations=1)
    TIMES["naive"] = benchmark.stats.stats.min


def test_bounded_9_levels_is_faster_than_naive_6_levels():
    if set(TIMES) != {"bounded", "naive"}:
        started = time.perf_counter()
        naive_build(laughs(6))
        TIMES.setdefault("naive", time.perf_counter() - started)
        started = time.perf_counter()
        with pytest.raises(SuiteError):
            load_yaml_with_lines(laughs(9), "laughs.yaml")
        TIMES.setdefault("bounded", time.perf_counter() - started)
    ratio = TIMES["naive"] / TIMES["bounded"]
    print(f"\nnaive 6 levels {TIMES['naive'] * 1e3:.1f} ms, bounded 9 levels {TIMES['bounded'] * 1e3:.2f} ms: ratio {ratio:.0f}x")
    assert ratio > 1
