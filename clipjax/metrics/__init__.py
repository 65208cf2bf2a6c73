"""Embedding-spectrum and geometry metrics of the global batch, and a host-side collapse alarm.

`plot_spectrum_history` lives in `clipjax.metrics.plot` so that importing the metrics does not
import matplotlib.
"""

from clipjax.metrics.collapse import ALARM_FIELDS, CollapseAlarm  # noqa: F401
from clipjax.metrics.collisions import (  # noqa: F401
    collision_stats,
    expected_collision_count,
    expected_collision_rate,
)
from clipjax.metrics.embedding import (  # noqa: F401
    SPECTRUM_KEYS,
    embedding_metrics,
    reference_embedding_metrics,
    split_spectra,
)
from clipjax.metrics.geometry import (  # noqa: F401
    alignment,
    logit_stats,
    mean_pairwise_cosine,
    modality_gap,
    uniformity,
)
from clipjax.metrics.spectrum import (  # noqa: F401
    covariance,
    dims_for_variance,
    effective_rank,
    eigenvalues,
    power_law_alpha,
    spectrum_metrics,
)
