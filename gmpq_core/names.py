"""Names the ``gmpq`` command's help shows, torch-free (``gmpq --help`` and ``gmpq COMMAND --help`` import no torch):
the built-in models, which ``models.registry`` registers (a test checks they are exactly these), and the model and
proxy dataset a search job (``jobs.SearchJob``) defaults to."""
from __future__ import annotations

BUILTIN_MODELS = ("mobilenet_v2", "resnet18", "resnet20", "resnet50")   # sorted, as models.list_models() gives them
SEARCH_MODEL, SEARCH_DATASET = "resnet20", "fashion_mnist"
