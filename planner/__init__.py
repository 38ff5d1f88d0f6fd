"""The planner: where a model runs and how fast it is predicted to run there.

A consumer of both the passes (placement) and the cost model (prices). `workload.py` says
what runs (one Workload, one set of defaults); `placement.py` parses the one placement spec
and turns it into a placed graph (layer, graph, auto or user passes); `auto*.py` search the
placement space with the cost model (`place_auto`; `AutoPlacer` is its one entry);
`predict.py` sweeps placed graphs into llama-sweep-bench tables, `report.py` formats and
plots them, `dataset.py` builds the calibration cases.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "AutoError": "planner.auto", "AutoPlan": "planner.auto", "AutoResult": "planner.auto",
    "explain": "planner.auto_report", "place_auto": "planner.auto_search",
    "AutoPlacer": "planner.placement", "PlaceOptions": "planner.placement", "parse_placement": "planner.placement",
    "place": "planner.placement", "ModePrediction": "planner.predict", "Prediction": "planner.predict",
    "predict_placed": "planner.predict", "DEFAULT_ENGINE": "planner.workload",
    "DEFAULT_HW": "planner.workload", "Workload": "planner.workload", "WorkloadError": "planner.workload",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """(`predict` is also a module's name: import it from planner.predict.) Names load with their module: a verb that only needs the workload's defaults (every
    verb's options do) does not import the search and the cost model."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'planner' has no attribute {name!r}")
