"""PrunePath: structured, dynamic FFN sparsity for Hugging Face transformers.

Convert a model's FFNs into experts with a softmax router, pick experts per token under a cumulative-mass
budget τ, and turn τ at run time on one checkpoint::

    import prunepath
    model, tok = prunepath.load_model("smollm2-135m")
    prunepath.moefy(model, neurons_per_expert=32)
    prunepath.configure(model, tau=0.8)
    model(**tok("Hello", return_tensors="pt"))
    print(prunepath.sparsity(model).s_ffn)
"""

from prunepath._version import __version__
from prunepath.checkpoint import load, save
from prunepath.conversion.clustering import balanced_kmeans, cluster_neurons
from prunepath.conversion.moefy import PrunePathConfig, is_converted, moefy, prunepath_modules
from prunepath.errors import PrunePathError
from prunepath.models.adapters import supported_model_types
from prunepath.models.loading import load_model
from prunepath.models.registry import BUILTIN_MODELS, DEFAULT_MODEL
from prunepath.routing.config import RoutingConfig
from prunepath.routing.control import configure, routing_scope
from prunepath.routing.ffn import PrunePathFFN
from prunepath.routing.selection import select_experts
from prunepath.state import PrunePathState, state_of
from prunepath.stats import SparsityStats, sparsity
from prunepath import registrations  # noqa: F401,E402  (fills the method registries, once)
from prunepath import routing  # noqa: E402  (the subpackage; callable as the old ``prunepath.routing(model, ...)``)


__all__ = [
    "BUILTIN_MODELS", "DEFAULT_MODEL", "PrunePathConfig", "PrunePathError", "PrunePathFFN", "PrunePathState",
    "RoutingConfig",
    "SparsityStats", "balanced_kmeans", "cluster_neurons", "configure", "is_converted", "load", "load_model",
    "moefy", "prunepath_modules", "routing", "routing_scope", "save", "select_experts", "sparsity", "state_of",
    "supported_model_types",
]
