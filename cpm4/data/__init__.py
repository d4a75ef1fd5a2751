"""UltraClean data preparation: text normalization, the fastText quality classifier and corpus filtering.

Heavy dependencies (fastText, pyarrow, matplotlib, pyspark) are imported by the functions that need them.
"""

from .metrics import binary_metrics, roc_auc
from .normalize import normalize

__all__ = [
    "Scorer",
    "TrainConfig",
    "balanced_shares",
    "binary_metrics",
    "filter_documents",
    "normalize",
    "roc_auc",
    "train_classifier",
]


def __getattr__(name: str):
    # Lazy so that `import cpm4.data` (and the CLI) stay fast and work without fastText installed.
    if name in ("Scorer", "TrainConfig", "balanced_shares", "train_classifier"):
        from . import classifier

        return getattr(classifier, name)
    if name == "filter_documents":
        from .filter import filter_documents

        return filter_documents
    raise AttributeError(name)
