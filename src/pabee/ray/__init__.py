"""Early exit on Ray: batch prediction over Ray Data (`predict_dataset`) and serving on Ray Serve (`deployment`).

Needs the `pabee[ray]` extra. Each Ray actor or replica loads the model once and runs the same pipeline and exit
loop as the single-process commands, so the answers are the same; Ray adds the scheduling across cores and
machines.
"""

from __future__ import annotations

from ..errors import require_extra

require_extra("ray", ("ray",), "pabee.ray")

from .batch_predict import predict_dataset  # noqa: E402
from .serving import deployment  # noqa: E402

__all__ = ["deployment", "predict_dataset"]
