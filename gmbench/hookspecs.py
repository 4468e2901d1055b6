"""Hook specifications and plugin contracts: one hook and one ``Protocol`` per plugin kind.

Built-in methods and third-party packages implement the same hooks.  Each hook
returns one plugin class or a list of them; the class satisfies the kind's
protocol below (``tests/test_plugin_contracts.py`` checks every built-in).

Every plugin class

* has a class attribute ``name`` (unique within its kind; what suites use);
* takes its parameters as keyword arguments of ``__init__``.  Their defaults and
  annotations are what ``gmbench plugins`` prints and what suites are checked
  against before anything runs (:func:`gmbench.plugins.check_parameters`);
  annotate each as ``typing.Annotated[type, "one-line description"]`` (see
  :mod:`gmbench.parameters` for the types understood, ``Literal`` for choices);
* has a docstring whose first line is its summary.

Conventions the framework relies on:

* a parameter named after a plugin kind together with ``<kind>_params`` (the
  ``gmcn`` model's ``reduction`` / ``reduction_params``) is a nested plugin
  choice: the name of a plugin of that kind and a mapping of its parameters,
  checked like a top-level one;
* models are built with ``num_classes=`` and ``dims=`` from the data set; a model
  with an ``in_features`` parameter is a *point model* (PointNet): it receives
  points ``[B, P, dims + in_features]`` (``input: points``: ``in_features=0``;
  ``input: gm``: each Gaussian as a point with its weight and covariance as
  features) and the runner sets ``in_features``; any other model receives
  mixtures ``[B, 1, N, 1+D+D*D]``;
* data sets accept ``data_root`` (``--data-root``; ``None``: their default,
  e.g. ``$GMBENCH_DATA``) and ``seed``.

A third-party package needs only this::

    # pyproject.toml
    [project.entry-points.gmbench]
    my_method = "my_package.plugin"

    # my_package/plugin.py
    from gmbench.plugins import hookimpl

    @hookimpl
    def gmbench_reduction():
        return MyReduction
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, ClassVar, Protocol

import pluggy

if TYPE_CHECKING:
    from torch import Tensor

    from gmbench.data.records import PointSetSplit
    from gmbench.loggers.records import CellInfo, ReportInfo

hookspec = pluggy.HookspecMarker("gmbench")


# --------------------------------------------------------------------------- contracts


class BackendPlugin(Protocol):
    """Evaluates and convolves mixtures; every mixture operation of :mod:`gmbench.mixture`
    goes through the active backend (:func:`gmbench.backends.use`).

    Mixtures: ``[B, C, N, 1+D+D*D]`` normalised Gaussians (paper Eq. 1),
    ``gm(x) = sum_i a_i g(x; b_i, C_i)``.  Optional method:
    ``evaluate_weight_sets_at_centroids(m [..., N, K], weight_sets [..., N, W]) -> [..., N, W]``,
    the same Gaussians with ``W`` weight vectors in one pass (otherwise gmbench
    calls ``evaluate_at_centroids`` once per set).
    """

    name: ClassVar[str]

    def evaluate(self, m: Tensor, points: Tensor) -> Tensor:
        """``m [B, C, N, K]`` at ``points [B, C, M, D]`` or ``[M, D]`` -> ``[B, C, M]`` (Eq. 1)."""

    def evaluate_at_centroids(self, m: Tensor) -> Tensor:
        """Each mixture at its own centres: ``[B, C, N, K] -> [B, C, N]`` (the O(N^2) part of Eq. 7)."""

    def convolve(self, data: Tensor, kernels: Tensor) -> Tensor:
        """``data [B, F_i, N_i, K]`` * ``kernels [F_o, F_i, N_k, K]`` -> ``[B, F_o, F_i*N_i*N_k, K]``
        (Eq. 3-4: weights multiply, positions and covariances add; summed over input channels)."""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why the backend cannot run on this machine (and what to do), ``None`` when it can."""


class TransferFittingPlugin(Protocol):
    """Fits the transfer function (ReLU) of a mixture with a mixture (Section 4.1, Appendices B, C, G)."""

    name: ClassVar[str]

    def fit(self, m: Tensor) -> Tensor:
        """``m [B, C, N, K] -> [B, C, N', K]`` representing ``relu(m)`` (Eq. 6-7 for ``dense``)."""


class ReductionPlugin(Protocol):
    """Reduces each mixture to fewer Gaussians (Section 4.1 pooling, Appendix D)."""

    name: ClassVar[str]

    def reduce(self, m: Tensor, n_components: int) -> Tensor:
        """``m [B, C, N, K] -> [B, C, n_components, K]`` approximating ``m``; padded with
        zero-weight Gaussians when ``N <= n_components``."""


class InputFittingPlugin(Protocol):
    """Fits a mixture to each point set: the network input (Section 5, Table 4)."""

    name: ClassVar[str]

    def fit(self, points: Tensor, n_components: int, weights: Tensor | None = None) -> Tensor:
        """``points [B, P, D]`` with optional per-point ``weights [B, P]`` ->
        ``[B, 1, n_components, 1+D+D*D]``, normalised as the paper's input (Section 5)."""


class ModelPlugin(Protocol):
    """A classifier, a ``torch.nn.Module`` built with ``num_classes=`` and ``dims=`` plus its
    own parameters (a point model also takes ``in_features``, see the module docstring).

    Optional method: ``regularization_loss()`` or ``regularization_loss(learning_rate=)``,
    added to the NLL loss by the trainer (the GMCN's Eq. 8 weight decay scales with the
    current learning rate, so the trainer passes it when the method takes it).
    """

    name: ClassVar[str]

    def forward(self, x: Tensor) -> Tensor:
        """Mixtures ``[B, 1, N, K]`` (or points ``[B, P, dims + in_features]``) ->
        log-probabilities ``[B, num_classes]``."""


class DatasetPlugin(Protocol):
    """A labelled data set of point sets; built with ``data_root=`` and ``seed=`` plus its own
    parameters.

    Optional method: ``check()``, cheap, raising :class:`gmbench.errors.DataError` when
    local files are missing (called before any cell of a suite starts).
    """

    name: ClassVar[str]

    def load(self, split: str) -> PointSetSplit:
        """``"train"`` or ``"test"`` -> :class:`gmbench.data.records.PointSetSplit`
        (points ``[S, P, D]``, labels ``[S]``, optional weights ``[S, P]``)."""


class LoggerPlugin(Protocol):
    """Experiment tracking: mirrors a run into a tracking tool (TensorBoard, MLflow).

    The run folder's files (``epochs.jsonl``, ``metrics.json``, ``results.csv``) stay
    the source of truth and are always written; a logger gets copies, each after it is
    on disk.  One instance per cell, built in the process that runs the cell (rank 0
    under data parallelism), is called in this order: ``start_cell`` once; for a
    training cell ``resume`` once, before the first new epoch (also with no epochs
    restored); ``log_epoch`` per epoch; ``log_diagnostics`` when the cell has
    ``diagnostics: true``; ``end_cell`` once, for a failed cell too.  A report is
    given to a fresh instance's ``log_report``.  A logger that raises during a cell
    is warned about once and left out for the rest of that cell.
    """

    name: ClassVar[str]

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """The missing package and its install command (``pip install 'gmbench[mlflow]'``),
        ``None`` when the logger can run; asked before any cell runs."""

    def start_cell(self, cell: CellInfo) -> None:
        """A cell starts (again): suite, cell id, the resolved configuration as
        hyper-parameters (``cell.hyperparameters()``), the run's environment."""

    def resume(self, history: list[dict]) -> None:
        """The epochs the trainer continues from (restored from the checkpoint; ``[]`` on a
        fresh start): log those this logger lacks, and drop any later ones it logged
        before, so that a resumed cell has every epoch exactly once."""

    def log_epoch(self, record: dict) -> None:
        """One finished epoch, the line of ``epochs.jsonl`` (``epoch``, ``train_loss``,
        ``train_accuracy``, ``test_accuracy``, ``lr``, ``epoch_time_s``, ``samples_per_s``,
        ``peak_memory_mb``)."""

    def log_diagnostics(self, rows: list[dict], step: int) -> None:
        """Per-layer fitting errors (``diagnostics.csv``, Tables 10-11): rows with ``layer``
        (``"1->8"``), ``method``, ``metric`` (``all``, ``relu``, ``reduction``,
        ``reduction_l2``) and ``value``, measured after epoch ``step``."""

    def end_cell(self, metrics: dict) -> None:
        """The cell ended: ``metrics.json`` (final and smoothed accuracy, times, ``status``
        ``ok``/``failed``/``diverged``/``oom``, one-line ``error``)."""

    def log_report(self, report: ReportInfo) -> None:
        """A report of the run was written: ``report.md`` and its figures, as artifacts."""


# --------------------------------------------------------------------------- hooks


@hookspec
def gmbench_backend() -> type[BackendPlugin] | list[type[BackendPlugin]]:
    """Compute backends (:class:`BackendPlugin`)."""


@hookspec
def gmbench_transfer_fitting() -> type[TransferFittingPlugin] | list[type[TransferFittingPlugin]]:
    """Transfer-function (ReLU) fitting methods (:class:`TransferFittingPlugin`)."""


@hookspec
def gmbench_reduction() -> type[ReductionPlugin] | list[type[ReductionPlugin]]:
    """Mixture reduction methods (:class:`ReductionPlugin`)."""


@hookspec
def gmbench_input_fitting() -> type[InputFittingPlugin] | list[type[InputFittingPlugin]]:
    """Input fitting methods (:class:`InputFittingPlugin`)."""


@hookspec
def gmbench_model() -> type[ModelPlugin] | list[type[ModelPlugin]]:
    """Classification models (:class:`ModelPlugin`)."""


@hookspec
def gmbench_dataset() -> type[DatasetPlugin] | list[type[DatasetPlugin]]:
    """Data sets (:class:`DatasetPlugin`)."""


@hookspec
def gmbench_logger() -> type[LoggerPlugin] | list[type[LoggerPlugin]]:
    """Experiment trackers fed by the trainer and runner (:class:`LoggerPlugin`)."""


def _protocol(hook) -> type:
    """The protocol named by a hook's return annotation ``type[P] | list[type[P]]``."""
    returned = typing.get_type_hints(hook)["return"]
    single = typing.get_args(returned)[0]  # type[P]
    return typing.get_args(single)[0]


HOOKS = {
    name.removeprefix("gmbench_"): spec for name, spec in list(globals().items()) if hasattr(spec, "gmbench_spec")
}
# One plugin kind per hook, in the order the hooks are defined above.
KINDS = tuple(HOOKS)
PROTOCOLS: dict[str, type] = {kind: _protocol(hook) for kind, hook in HOOKS.items()}
