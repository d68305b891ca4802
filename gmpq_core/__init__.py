"""GMPQ core: pure PyTorch (never imports ray, optuna, mlflow or pyarrow)."""
from .bitops import BitOpsReport, LayerCost, count_bitops, layer_macs
from .errors import BudgetInfeasibleError, CheckpointError, ConfigError, DataError, GMPQError, PolicyMismatchError
from .layers import fingerprint, searchable_layers, swap_module
from .models import build_model, list_models
from .policy import BitCandidates, BitPolicy, QuantSpec
from .qmodules import QuantConv2d, QuantLinear, apply_policy_, calibrate_
from .reporting import ListReporter, NullReporter, Reporter
from .search import Budget, SearchConfig, SearchResult, build_supernet, derive_policy, search_policy
from .supernet import MixedConv2d, MixedLinear
from .jobs import SearchJob, get_teacher, run_search_job

__version__ = "0.1.0"
