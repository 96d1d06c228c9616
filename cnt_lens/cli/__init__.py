"""The ``cnt-lens`` command line (typer: typed options, help text and errors for free).

cnt-lens demo --out runs/demo          # the main job, offline, on the bundled SmolLM2
cnt-lens run realign --out runs/realign  # enhance | disalign | realign | bias-removal
cnt-lens transfer --donor D --target T --out runs/mine   # any compatible pair, any prompt files
cnt-lens score --donor D --target T --out runs/scores    # neuron scores only
cnt-lens measure smollm2-135m-instruct # behaviour numbers of any model
cnt-lens transplant PATCH MODEL --out DIR
cnt-lens report runs/demo              # rebuild report.html from a run directory

:mod:`~cnt_lens.cli.commands` holds the commands, :mod:`~cnt_lens.cli.options` the options as data,
:mod:`~cnt_lens.cli.inputs` what they read (prompts, models), each checked with a clear error.
"""

from cnt_lens.cli.commands import EXPECTED, app

__all__ = ["EXPECTED", "app"]
