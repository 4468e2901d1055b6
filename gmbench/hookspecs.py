"""Hook specifications: one hook per plugin kind.

Built-in methods and third-party packages implement the same hooks.  Each hook
returns one plugin class or a list of them.  A plugin class has a class
attribute ``name`` (unique within its kind) and takes its parameters as keyword
arguments of ``__init__``; the parameters' defaults and annotations are what
``gmbench plugins`` prints and what suites are validated against.  The class
docstring is the plugin's documentation (first line: a summary).

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

import pluggy

hookspec = pluggy.HookspecMarker("gmbench")


@hookspec
def gmbench_backend():
    """Compute backends. Instances implement ``evaluate(m, points)``,
    ``evaluate_at_centroids(m)`` and ``convolve(data, kernels)`` on mixtures in
    the layout of :mod:`gmbench.mixture`; the classmethod
    ``unavailable_reason() -> str | None`` says why it cannot run on this
    machine (``None`` when it can).  Optional:
    ``evaluate_weight_sets_at_centroids(m, weight_sets)`` (``[..., N, W]``
    weight vectors for the same Gaussians, one pass; otherwise gmbench calls
    ``evaluate_at_centroids`` once per set)."""


@hookspec
def gmbench_transfer_fitting():
    """Transfer-function (ReLU) fitting methods. Instances are called as
    ``fit(m) -> m2``: ``m`` is ``[B, C, N, 1+D+D*D]``, ``m2`` has the same shape
    and represents ``relu(m)`` (paper Section 4.1, Appendices B-C)."""


@hookspec
def gmbench_reduction():
    """Mixture reduction methods. Instances are called as
    ``reduce(m, n_components) -> m2`` with ``m2`` of shape
    ``[B, C, n_components, 1+D+D*D]`` (paper Section 4.1, Appendix D)."""


@hookspec
def gmbench_input_fitting():
    """Input fitting methods. Instances are called as
    ``fit(points, n_components, weights=None) -> m`` with ``points`` of shape
    ``[B, P, D]``, optional per-point ``weights`` ``[B, P]`` and ``m`` of shape
    ``[B, 1, n_components, 1+D+D*D]`` (paper Section 5)."""


@hookspec
def gmbench_model():
    """Classification models (``torch.nn.Module`` subclasses). Constructed with
    the keyword arguments ``num_classes`` and ``dims`` plus their own
    parameters; ``forward`` returns log-probabilities ``[B, num_classes]``. An
    optional ``regularization_loss()`` is added to the NLL loss by the trainer."""


@hookspec
def gmbench_dataset():
    """Data sets. Instances have ``load(split) -> PointSetSplit`` for the splits
    ``"train"`` and ``"test"`` (see :mod:`gmbench.data.records`) and optionally a
    cheap ``check()`` that raises :class:`gmbench.errors.DataError` when local
    files are missing (the runner calls it before any cell starts)."""


# One plugin kind per hook, in the order the hooks are defined above.
KINDS = tuple(
    name.removeprefix("gmbench_") for name, spec in list(globals().items()) if hasattr(spec, "gmbench_spec")
)
