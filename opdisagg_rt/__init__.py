"""opdisagg_rt: an LLM inference runtime with operation-level disaggregation and a shared KV store.

Importing the package is cheap: heavy modules (engine, models) load on first use.
"""

__version__ = "0.1.0"

__all__ = ["Engine", "SamplingParams", "RequestOutput"]


def __getattr__(name: str):
    if name == "Engine":
        from opdisagg_rt.engine import Engine
        return Engine
    if name == "SamplingParams":
        from opdisagg_rt.sampling import SamplingParams
        return SamplingParams
    if name == "RequestOutput":
        from opdisagg_rt.outputs import RequestOutput
        return RequestOutput
    raise AttributeError(name)
