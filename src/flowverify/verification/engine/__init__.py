"""The bound-propagation engine: any traced feed-forward model, any input domain.

Folders by job: :mod:`.graph` (model -> graph of operators), :mod:`.affine` and
:mod:`.activations` (one module per operator family), :mod:`.domains` (the W1 ball and
polytope of Theorems 3 and 6, Lp balls) and :mod:`.crown` (backward bound propagation and
the radius oracle), :mod:`.bab` with :mod:`.subdomain` and :mod:`.region` (branch and
bound on ReLU splits) and :mod:`.comparison` (radii in any domain, W1 against Lp).
"""

from flowverify.verification.engine.comparison import domain_radii
from flowverify.verification.engine.crown import EngineProblem, backward
from flowverify.verification.engine.domains import DOMAINS, Domain, make_domain
from flowverify.verification.engine.graph import SUPPORTED, Graph, Node, build_graph

__all__ = [
    "DOMAINS",
    "SUPPORTED",
    "Domain",
    "EngineProblem",
    "Graph",
    "Node",
    "backward",
    "build_graph",
    "domain_radii",
    "make_domain",
]
