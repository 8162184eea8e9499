"""Early exit on Ray: batch prediction over Ray Data (`predict_dataset`) and serving on Ray Serve (`deployment`).

Needs the `pabee[ray]` extra. Each Ray actor or replica loads the model once and runs the same pipeline and exit
loop as the single-process commands, so the answers are the same; Ray adds the scheduling across cores and
machines. The two halves are imported when first used: a batch job need not load Ray Serve and FastAPI.
"""

from __future__ import annotations

from typing import Any

from ..errors import require_extra

require_extra("ray", ("ray",), "pabee.ray")

__all__ = ["deployment", "predict_dataset"]


def __getattr__(name: str) -> Any:
    if name == "predict_dataset":
        from .batch_predict import predict_dataset

        return predict_dataset
    if name == "deployment":
        from .serving import deployment

        return deployment
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
