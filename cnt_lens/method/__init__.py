"""The method layer: scoring, selection, the weight-space patch, the minimal search and evaluation.

Settings (:mod:`~cnt_lens.method.config`) and the resumable cache (:mod:`~cnt_lens.method.resume`)
live here too: they are what a transfer is computed with.
"""
