"""Capture: forward hooks on the training model → a bounded row cache → shards handed to storage.

``layers`` resolves layer names (with close-match errors), ``sampler`` is the capture core
(:class:`ActivationSampler`), ``hooks`` the manual-hook front end (:class:`MechIntHooks`) and
``callback`` the Lightning front end (:class:`MechIntCallback`).

May import: ``mechray.config``, ``mechray.errors``, ``mechray.storage`` (to hand shards to the
writers). Never ``mechray.analysis`` or ``mechray.api``.
"""
