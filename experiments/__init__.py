"""The experiment harness: the VOC2007 runs behind ``results/``, not part of the installed package.

Run from the repository root as modules (``python -m experiments.voc07 ...``; the Makefile's
``voc07-*`` and ``repro-*`` targets do), so that ``experiments`` imports without being installed.
``sppdet`` never imports this package.

- :mod:`experiments.stages`: each ``sppdet`` command as a timed child process, alone or in lanes.
- :mod:`experiments.voc07`: VOC2007 train -> val, every stage, then ``results/<name>_*.json``.
- :mod:`experiments.mode_compare`: SPP-net against R-CNN mode on the same images and settings.
- :mod:`experiments.results_table`: the tables of ``docs/results.md`` and ``docs/speed.md``.
- :mod:`experiments.repro` / :mod:`experiments.repro_check` / ``repro.sh``: does a clean rerun
  reproduce a committed result?
"""
