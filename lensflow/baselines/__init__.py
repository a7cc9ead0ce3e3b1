"""Baselines: lensflow's lens model run through other codes, for parity checks and comparison.

The baseline modules, all needing the ``baselines`` extra
(``pip install 'lensflow[baselines]'``), so import them explicitly and lensflow itself never
needs the extra:

* ``lensflow.baselines.lenstronomy``: the translation to lenstronomy's keyword lists and its
  image model (``to_lenstronomy``, ``render_lenstronomy``), and the lenstronomy + emcee
  baseline as lenstronomy users run it (``run_lenstronomy``: ``FittingSequence`` PSO then
  emcee, amplitudes solved linearly). The only module importing lenstronomy.
* ``lensflow.baselines.mcmc``: MCMC on lensflow's own batched caustics likelihood:
  ``run_emcee`` (every walker in one batched call) and ``run_nuts`` (Pyro's NUTS in the
  unconstrained space), with their convergence diagnostics.
* ``lensflow.baselines.smc``: tempered SMC on the same likelihood from a set of starting
  samples (``run_smc``; the flow's, for ``lensflow fit --fallback smc`` and the bench's
  ``flow+smc``), with its diagnostics and the log evidence.

Every baseline returns a ``lensflow.sampling.PosteriorSamples`` in registry names and units,
inside a frozen result record that also carries its convergence diagnostics.

The flow-vs-MCMC benchmark (``lensflow bench``) runs them next to the flow:
``lensflow.baselines.bench`` (configs, lenses, running the methods, the summary and issue 3's
goals) and ``lensflow.baselines.report`` (JSON records, the Markdown block, the figures).
"""

__all__: list[str] = []
