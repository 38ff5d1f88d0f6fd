"""The planner: where a model runs and how fast it is predicted to run there.

A consumer of both the passes (placement) and the cost model (prices): `placement.place`
turns one placement spec into a placed graph (layer, graph, auto or user passes), `auto*.py`
search the placement space with the cost model (`place_auto`), `predict.py` sweeps placed
graphs into llama-sweep-bench tables, `report.py` formats and plots them, `dataset.py` builds
the calibration cases.
"""

from planner.auto import AutoError, AutoPlan, AutoResult, AutoWorkload, place_auto
from planner.placement import PlaceOptions, place
from planner.predict import ModePrediction, Prediction, Workload, predict, predict_placed

__all__ = ["AutoError", "AutoPlan", "AutoResult", "AutoWorkload", "ModePrediction", "PlaceOptions", "Prediction",
           "Workload", "place", "place_auto", "predict", "predict_placed"]
