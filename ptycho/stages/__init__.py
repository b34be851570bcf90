"""The applications' stages (:mod:`ptycho.app`), each a function with a typed result:
fitting the network (:mod:`~ptycho.stages.fit`), the network's evaluation of a scan
(:mod:`~ptycho.stages.evaluate`), the physics refinement (:mod:`~ptycho.stages.refine`),
writing a run's outputs (:mod:`~ptycho.stages.write`). Loading the data is
:func:`ptycho.data.load_scans`."""
