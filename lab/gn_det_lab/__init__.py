"""gn_det_lab: the research harness behind the lab's studies and benchmarks (``lab/tools/``).

Not part of gn_det and never installed: the scripts put ``lab/`` on ``sys.path``, the tests get
it from pytest's ``pythonpath``. It uses gn_det's public API only.

- :mod:`gn_det_lab.transfer`: feature- and detector-level weight-transfer studies
  (``lab/tools/transfer_study.py``).
- :mod:`gn_det_lab.runs`: resumable training runs in child processes (the study grids).
- :mod:`gn_det_lab.memory`: process memory as the benchmarks measure it, and the bytes autograd
  keeps for backward (:class:`~gn_det_lab.memory.SavedForBackward`).
- :mod:`gn_det_lab.folding`: folding GroupNorm stage by stage (fixed affines, distilled, then
  folded into the convolutions), for ``lab/tools/fold_study.py``.
- :mod:`gn_det_lab.random_weights`: random detectors normalised like trained ones.
- :mod:`gn_det_lab.results`: results files for ``lab/tools/render_results.py`` and their tables.
- :mod:`gn_det_lab.bootstrap`, :mod:`gn_det_lab.backbone`, :mod:`gn_det_lab.bn_statistics`,
  :mod:`gn_det_lab.pretrain`: intervals of AP, the backbone route, BN's test statistics, and
  the proxy pretraining.
"""
