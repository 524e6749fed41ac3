"""Metrics for training loops: `Average`, `Accuracy`, `Welford`, `MultiMetric`.

See `spmdnnx._metrics` for the examples.
"""

from spmdnnx._metrics import Accuracy as Accuracy
from spmdnnx._metrics import Average as Average
from spmdnnx._metrics import Metric as Metric
from spmdnnx._metrics import MetricState as MetricState
from spmdnnx._metrics import MultiMetric as MultiMetric
from spmdnnx._metrics import Statistics as Statistics
from spmdnnx._metrics import Welford as Welford
