"""moe_interp: how Mixture-of-Experts language models use their context, and which experts make them
faithful to it.

>>> import moe_interp
>>> model, tok = moe_interp.load_demo()                                   # doctest: +SKIP
>>> t = moe_interp.trace(model, prompt, context=ctx, answer=ans, tokenizer=tok)  # doctest: +SKIP
>>> t.routing_frame()                                                      # doctest: +SKIP
"""

from moe_interp import prompts
from moe_interp.architectures import (
    MoEArchitecture,
    get_architecture,
    register_architecture,
    supported_architectures,
)
from moe_interp.errors import MoEInterpError, UnsupportedModelError
from moe_interp.moetrace import MoETrace
from moe_interp.routing import RoutingRule
from moe_interp.trace import trace

__all__ = [
    "MoEArchitecture",
    "MoEInterpError",
    "MoETrace",
    "RoutingRule",
    "UnsupportedModelError",
    "get_architecture",
    "load_demo",
    "prompts",
    "register_architecture",
    "supported_architectures",
    "trace",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_demo":  # imported on first use: the demo module reads package files
        from moe_interp.demo import load_demo

        return load_demo
    raise AttributeError(f"module 'moe_interp' has no attribute {name!r}")
