"""Training runtime pieces used by the launcher: models, data, loop."""

from spmdnnx.train.data import SyntheticRegression as SyntheticRegression
from spmdnnx.train.loop import TrainResult as TrainResult
from spmdnnx.train.loop import make_train_step as make_train_step
from spmdnnx.train.loop import train as train
from spmdnnx.train.models import MLPRegressor as MLPRegressor
