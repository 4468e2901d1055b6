"""Running suites.

* :mod:`gmbench.run.folder` -- the run folder's file names, formats and records (the only
  module that knows them); :mod:`gmbench.run.prepare` checks a folder against a suite;
  :mod:`gmbench.run.lock` -- one run per folder; :mod:`gmbench.run.results` -- results.csv.
* :mod:`gmbench.run.cell` -- one cell in this process (:class:`~gmbench.run.cell.RunOptions`,
  :func:`~gmbench.run.cell.run_cell`); :mod:`gmbench.run.launcher` -- a cell in this process
  or on data-parallel ranks (:mod:`gmbench.run.ranks`).
* :mod:`gmbench.run.suite_runner` -- a whole suite (:func:`~gmbench.run.suite_runner.run_suite`):
  prepare, lock, loop over the cells through an executor (:mod:`gmbench.run.executors`),
  with live progress (:mod:`gmbench.run.progress`).

Nothing is imported here: ``gmbench.run.folder`` and ``gmbench.run.ranks`` are read by
modules (the trainer, the report) that the runner itself imports.
"""
