"""Keys given for another task than the model's: one warning naming each and why it does nothing.

``probabilities=true`` with a detector, ``score_threshold`` with a classifier, ``output_crs``
with a segmenter that writes no vector layer: each was accepted and silently ignored, so a
user believed they had what they asked for. Only keys the user gave (command line or config
file) are named; a key's default never is. ``tta_fusion`` has its own line in the run, as it
also depends on ``tta``.
"""

from __future__ import annotations

from collections.abc import Collection

from mgpr.conf.schema import PredictConfig

#: Keys that act for one task only: key -> (the task, what the key does there).
TASK_KEYS: dict[str, tuple[str, str]] = {
    "probabilities": ("segmentation", "writes a segmenter's class probabilities"),
    "vectorize": ("segmentation", "writes a segmenter's class map as polygons"),
    "seam": ("segmentation", "joins a segmenter's tiles"),
    "score_threshold": ("detection", "drops a detector's weak boxes"),
    "nms_iou": ("detection", "merges a detector's overlapping boxes"),
    "seam_ios": ("detection", "merges a detector's boxes cut by tile seams"),
    "max_detections": ("detection", "caps a detector's boxes per tile"),
    "topk": ("classification", "keeps a classifier's best classes per tile"),
}


def unused_key_lines(cfg: PredictConfig, task: str, given: Collection[str]) -> list[str]:
    """One line per key in ``given`` that does nothing for a ``task`` model, in key order.

    Args:
        cfg: the run's config (``vectorize`` decides whether a segmenter writes vectors).
        task: the model's task: ``detection``, ``classification``, ``segmentation`` or
            ``embedding``.
        given: the keys the user set.
    """
    defaults = PredictConfig()
    # a config file names every key (a run's own config.yaml, --cfg job's output): a key at
    # its default is no choice the user made
    given = {k for k in given if getattr(cfg, k, None) != getattr(defaults, k, None)}
    lines = []
    for key, (owner, what) in TASK_KEYS.items():
        if key in given and task != owner:
            value = _shown(getattr(cfg, key))
            lines.append(
                f"{key}={value} {what}; this run's model is {_a(task)} model, so it does nothing"
            )
    writes_vectors = task != "segmentation" or cfg.vectorize
    if "output_crs" in given and cfg.output_crs and not writes_vectors:
        lines.append(
            f"output_crs={cfg.output_crs} reprojects the vector layers; a segmenter without "
            "vectorize=true writes none (its class maps stay on the input's grid), so it does "
            "nothing"
        )
    traced = task == "detection" or (task == "segmentation" and cfg.vectorize)
    if "simplify" in given and cfg.simplify > 0 and not traced:
        lines.append(
            f"simplify={cfg.simplify:g} simplifies traced outlines (instance masks, "
            f"vectorize=true segments); this {task} run traces none, so it does nothing"
        )
    return lines


def _shown(value: object) -> str:
    """A key's value as the user writes it: ``true``/``false``, ``none``, else as it is."""
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else str(value)


def _a(word: str) -> str:
    """``a detection`` / ``an embedding``."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"
