"""Language models the runtime trains: a Llama-style decoder LM and an MLP LM."""

from spmdnnx.models._cache import KVCache as KVCache
from spmdnnx.models._config import LMConfig as LMConfig
from spmdnnx.models._flops import flops_per_token as flops_per_token
from spmdnnx.models._flops import param_count as param_count
from spmdnnx.models._generate import generate as generate
from spmdnnx.models._generate import init_cache as init_cache
from spmdnnx.models._llama import DecoderLM as DecoderLM
from spmdnnx.models._loss import lm_loss as lm_loss
from spmdnnx.models._mlp import MlpLM as MlpLM
from spmdnnx.models._presets import build_model as build_model
from spmdnnx.models._presets import PRESETS as PRESETS
from spmdnnx.models._rope import apply_rope as apply_rope
