"""The training runtime: configs, grain data, the loop, metrics, sampling.

`run` trains a `spmdnnx.models` language model from an ml-collections config
(`base_config`, files in ``configs/``) in a work directory; the ``launch/``
programs are thin wrappers around it.
"""

from spmdnnx.train._config import base_config as base_config
from spmdnnx.train._config import model_config as model_config
from spmdnnx.train._config import parse_degrees as parse_degrees
from spmdnnx.train._config import pipeline_rules as pipeline_rules
from spmdnnx.train._config import RunPlan as RunPlan
from spmdnnx.train._config import validate as validate
from spmdnnx.train._data import Corpus as Corpus
from spmdnnx.train._data import decode as decode
from spmdnnx.train._data import encode as encode
from spmdnnx.train._data import eval_batches as eval_batches
from spmdnnx.train._data import list_files as list_files
from spmdnnx.train._data import Prefetcher as Prefetcher
from spmdnnx.train._data import SEPARATOR as SEPARATOR
from spmdnnx.train._data import split_files as split_files
from spmdnnx.train._data import stdlib_glob as stdlib_glob
from spmdnnx.train._data import train_dataset as train_dataset
from spmdnnx.train._distributed import define_flags as define_distributed_flags
from spmdnnx.train._distributed import DistributedConfig as DistributedConfig
from spmdnnx.train._distributed import initialize_from_flags as initialize_from_flags
from spmdnnx.train._distributed import ProcessInfo as ProcessInfo
from spmdnnx.train._fake_devices import use_fake_devices as use_fake_devices
from spmdnnx.train._faults import FaultHooks as FaultHooks
from spmdnnx.train._faults import HANG_EXIT_CODE as HANG_EXIT_CODE
from spmdnnx.train._faults import PreemptionGuard as PreemptionGuard
from spmdnnx.train._faults import StepWatchdog as StepWatchdog
from spmdnnx.train._local_launch import launch_local as launch_local
from spmdnnx.train._hlo import analyze_hlo as analyze_hlo
from spmdnnx.train._hlo import HloStats as HloStats
from spmdnnx.train._logs import process_log as process_log
from spmdnnx.train._loop import CHECKPOINT_DIR as CHECKPOINT_DIR
from spmdnnx.train._loop import CONFIG_FILE as CONFIG_FILE
from spmdnnx.train._loop import Hooks as Hooks
from spmdnnx.train._loop import load_config as load_config
from spmdnnx.train._loop import run as run
from spmdnnx.train._loop import RunResult as RunResult
from spmdnnx.train._loop import save_config as save_config
from spmdnnx.train._metrics import MetricsWriter as MetricsWriter
from spmdnnx.train._metrics import progress_line as progress_line
from spmdnnx.train._metrics import Throughput as Throughput
from spmdnnx.train._metrics import TRAIN_KEYS as TRAIN_KEYS
from spmdnnx.train._peaks import PEAK_TFLOPS as PEAK_TFLOPS
from spmdnnx.train._plan import LayoutPlan as LayoutPlan
from spmdnnx.train._plan import Plan as Plan
from spmdnnx.train._plan import plan_layouts as plan_layouts
from spmdnnx.train._plan_layouts import enumerate_layouts as enumerate_layouts
from spmdnnx.train._plan_layouts import Layout as Layout
from spmdnnx.train._peaks import peak_flops_per_device as peak_flops_per_device
from spmdnnx.train._roofline import DEVICE_KINDS as DEVICE_KINDS
from spmdnnx.train._roofline import DeviceKind as DeviceKind
from spmdnnx.train._roofline import get_device_kind as get_device_kind
from spmdnnx.train._sample import load_model as load_model
from spmdnnx.train._sample import Loaded as Loaded
from spmdnnx.train._sample import sample as sample
from spmdnnx.train._step import make_eval_step as make_eval_step
from spmdnnx.train._step import make_optimizer as make_optimizer
from spmdnnx.train._step import make_train_step as make_train_step
