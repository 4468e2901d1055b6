"""PointNet and PointNet++ baselines (paper Section 5.2, Table 1), imported as ``gmbench.baselines``.

* :mod:`~gmbench.baselines.pointnet` - model plugin ``pointnet``;
* :mod:`~gmbench.baselines.pointnet2` - model plugin ``pointnet2`` (SSG, torch-geometric);
* :mod:`~gmbench.baselines.sampling` - farthest point sampling and radius search
  (native kernels when installed, PyTorch fallback otherwise; :func:`sampling_backend`);
* :mod:`~gmbench.baselines.inputs` - the ``points`` and ``gm`` input variants;
* :mod:`~gmbench.baselines.augment` - optional training augmentation.

Baseline models take ``x [B, P, D + in_features]`` and return log-probabilities.
"""
