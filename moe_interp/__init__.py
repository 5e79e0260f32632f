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
    "count_selections",
    "evaluate",
    "identify_experts",
    "load_model",
    "mask_experts",
    "tune_routers",
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


#: public names imported on first use (keeps ``import moe_interp`` light)
_LAZY = {
    "load_demo": "moe_interp.demo",
    "load_model": "moe_interp.loading",
    "evaluate": "moe_interp.evaluation",
    "mask_experts": "moe_interp.routerlens",
    "tune_routers": "moe_interp.routerlens",
    "count_selections": "moe_interp.routerlens",
    "identify_experts": "moe_interp.routerlens",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moe_interp' has no attribute {name!r}")
