"""Fine-tuning methods as the federation engine runs them.

* :mod:`flux.methods.api`: the public method API (:class:`~flux.methods.api.Method`,
  :class:`~flux.methods.api.RunContext`); a user's own method subclasses it.
* :mod:`flux.methods.registry`: names -> ``"module:Class"``; torch-free, so a config is checked
  before anything heavy is imported; ``method = "mypkg.mymethod:MyMethod"`` names a user's class.
* :mod:`flux.methods.session`: the install / train / take deltas / uninstall skeleton of a
  participant's round, as a context manager.
* one file per method: :mod:`~flux.methods.fedavg`, :mod:`~flux.methods.fmd`,
  :mod:`~flux.methods.fmq`, :mod:`~flux.methods.fmes`, :mod:`~flux.methods.flux`.

Nothing is imported here (the registry must stay torch-free).
"""
