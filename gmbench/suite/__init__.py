"""Suites: YAML files that name a data set, shared settings and a matrix of cells.

A suite is data, not a script.  It is read as plain YAML data only (no tags,
bounded aliases, every value with its line; :mod:`gmbench.suite.yaml_lines`),
validated completely before anything runs, and expanded into *cells*: one
resolved configuration per experiment, identified by a short hash of that
configuration (:func:`cell_id`).  Schema (see ``docs/suites.md``)::

    name: quickstart                 # required; used in the default run folder
    description: ...                 # free text
    task: train                      # train | footprint | transfer_fitting_timing
    plugins: [my_package.plugin]     # extra plugin modules to import
    backend: torch                   # compute backend (overridden by --backend)
    backend_params: {cutoff: 1.0e-5} # the backend's parameters (gmbench plugins --kind backend)
    cell:                            # settings shared by every cell (the task's fields)
      dataset: digits
      n_gaussians: 16
      training: {epochs: 8}
    matrix:                          # a mapping, or a list of mappings (blocks)
      seed: [0, 1]                   # axis = a cell field or a dotted path: list of values
      model_params.reduction_params.T: [2, 4]
      variant:                       # any other axis name: mappings merged into the cell
        - {label: GMCN, model: gmcn}
        - {label: PointNet, model: pointnet, input: points}
    exclude:                         # cells matching every field of an entry are dropped
      - {label: PointNet, seed: 1}
    smoke: {training: {epochs: 1}}   # extra overrides under --smoke
    report: {tables: [...]}          # report layout (see gmbench.report)

Every string inside ``model_params`` may use the placeholders ``{n_gaussians}``
(resolved at expansion) and ``{num_classes}`` (resolved by the runner once the
data set is loaded), so one layout string serves several input sizes (Table 9).

Each task's cell fields (types, defaults, ranges), required fields, plugin choices, checks
and ``--smoke`` shrinking belong to its :class:`gmbench.tasks.Task`; this package looks
them up by the suite's ``task:``.

Modules: :mod:`~gmbench.suite.yaml_lines` (reading), :mod:`~gmbench.suite.schema`
(top-level keys, bounds, records), :mod:`~gmbench.suite.expansion` (matrix),
:mod:`~gmbench.suite.smoke` (``--smoke``), :mod:`~gmbench.suite.checks`,
:mod:`~gmbench.suite.plugin_checks` and :mod:`~gmbench.suite.cell_checks`
(validation), :mod:`~gmbench.suite.overrides` (``gmbench run --set PATH=VALUE``: a value for
every cell, applied after the matrix), :mod:`~gmbench.suite.loader` (all of it in order).
"""

from gmbench.suite.expansion import substitute_placeholders
from gmbench.suite.loader import load_suite, parse_suite
from gmbench.suite.schema import (
    CELL_FIELDS,
    MAX_CELLS,
    MAX_GAUSSIANS,
    REQUIRED_FIELDS,
    TASKS,
    TOP_LEVEL_KEYS,
    Cell,
    Field,
    Suite,
    cell_id,
)
from gmbench.suite.smoke import (
    SMOKE_MAX_GAUSSIANS,
    SMOKE_TEST_SAMPLES,
    SMOKE_TRAIN_SAMPLES,
    shrink_layout,
    shrink_report_filters,
    smoke_factor,
)
from gmbench.suite.yaml_lines import MAX_NODES, LDict, LList, load_value, load_yaml_with_lines, read_suite_text

__all__ = [
    "CELL_FIELDS", "MAX_CELLS", "MAX_GAUSSIANS", "MAX_NODES", "REQUIRED_FIELDS", "SMOKE_MAX_GAUSSIANS",
    "SMOKE_TEST_SAMPLES", "SMOKE_TRAIN_SAMPLES", "TASKS", "TOP_LEVEL_KEYS", "Cell", "Field", "LDict", "LList",
    "Suite", "cell_id", "load_suite", "load_value", "load_yaml_with_lines", "parse_suite", "read_suite_text",
    "shrink_layout", "shrink_report_filters", "smoke_factor", "substitute_placeholders",
]
