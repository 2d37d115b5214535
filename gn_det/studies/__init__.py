"""The research harness behind ``tools/``' studies and benchmarks — not part of the plugin's API.

- :mod:`gn_det.studies.transfer`: feature- and detector-level weight-transfer studies
  (``tools/transfer_study.py``).
- :mod:`gn_det.studies.runs`: resumable training runs in child processes (the study grids).
- :mod:`gn_det.studies.memory`: process memory as the benchmarks measure it.
- :mod:`gn_det.studies.random_weights`: random detectors normalised like trained ones.
- :mod:`gn_det.studies.results`: results files for `tools/render_results.py` and their tables.

Nothing in the plugin (conversion, transfer, config, checkpoints, training) imports from here.
"""
