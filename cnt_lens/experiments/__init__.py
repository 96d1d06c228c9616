"""Experiments built on the library: the bundled model's applications and the fine-tunes that make their models.

Nothing in the library imports this package (only the CLI's ``demo``/``run``/``report`` commands
do); a fork that brings its own donor and target can delete it.

* :mod:`~cnt_lens.experiments.recipes` — seeded, cached fine-tunes (``safety_tune``, ``bias_tune``,
  ``harmful_finetune``, ``compliance_tune``) that build demo donors and targets offline.
* :mod:`~cnt_lens.experiments.applications` — CNT's and NLSR's applications end to end
  (``cnt-lens run APP``).
"""
