"""Cost model: the time of placed graphs from hardware profiles (hardware/) and engine profiles.

    from planner.predict import predict   # the sweep over placed graphs lives in the planner
    p = predict("qwen3-next-80b-a3b", "2x3090", "ik_llama.cpp", "IQ4_XS", "q8_0")
    p.table(); p.crossover("pp"); p.modes["graph"].dominant("tg")

Layers: rules (work per op) -> price (per-node coefficients, once per graph) -> timeline
(seconds per depth, vectorised) -> calibrate (fit engine parameters to measured tables);
planner.predict sweeps them into tables. docs/cost_model.md describes every term.
"""

from backends.costmodel.calibrate import Case, FitResult, fit
from backends.costmodel.price import Priced, price
from backends.costmodel.profiles import Engine, engine_names, load_engine
from backends.costmodel.rules import RULES, Work, distinct_experts, work
from backends.costmodel.timeline import TERMS, Span, Timeline, evaluate, trace

__all__ = ["Case", "FitResult", "fit", "Priced", "price", "Engine", "engine_names", "load_engine", "RULES", "Work", "distinct_experts", "work", "TERMS", "Span", "Timeline", "evaluate",
           "trace"]
