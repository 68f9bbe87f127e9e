"""The ``sae`` analysis: sparse autoencoders trained on a layer's stored rows.

Importing this package registers the analysis.  One module per concern, in the order a fit
uses them: ``params`` (validated parameters and limits), ``rows`` (the layer's rows, streamed
and split off for held-out evaluation), ``budget`` (steps, lr, convergence and warnings),
``model`` (the SAE and its files, SAELens' layout included), ``train`` (the optimiser step),
``fit`` (one SAE's run, and one pass over the rows feeding several), ``sweep`` (several SAEs
on one read of the rows), ``distributed`` (the same training on Ray Train workers),
``checkpoint`` (resumable state),
``evaluate`` (held-out metrics and splicing into the model), ``examples`` (top-activating rows)
and ``analysis`` (the registered :class:`SAEAnalysis` tying them together).

Usage::

    from mechray.analysis.sae import SAEAnalysis, SAEParams
    from mechray.analysis.sae.model import load_sae, load_saelens
"""

from mechray.analysis.sae.analysis import SAEAnalysis
from mechray.analysis.sae.params import SAEParams

__all__ = ["SAEAnalysis", "SAEParams"]
