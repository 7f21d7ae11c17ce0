"""One module per task: its per-tile output, its per-rank part payload, its merge.

:func:`get_task` is the registry: ``adapter.task`` (a name) -> the :class:`~mgpr.tasks.base.Task`
object the run, the part writer and the merge talk to (no ``if task == ...`` elsewhere).
"""

from __future__ import annotations

from mgpr.errors import ModelError
from mgpr.tasks.base import Task, TaskContext, TileOutcome
from mgpr.tasks.classification import ClassificationTask
from mgpr.tasks.detection import DetectionTask
from mgpr.tasks.embedding import EmbeddingTask
from mgpr.tasks.segmentation import SegmentationTask

#: Task name -> its class; adding a task is one module and one entry here.
TASKS: dict[str, type[Task]] = {
    ClassificationTask.name: ClassificationTask,
    DetectionTask.name: DetectionTask,
    SegmentationTask.name: SegmentationTask,
    EmbeddingTask.name: EmbeddingTask,
}


def get_task(name: str) -> Task:
    """The task object for a model's ``task``; one line naming the known ones otherwise."""
    try:
        return TASKS[name]()
    except KeyError:
        raise ModelError(
            f"task={name!r} has no output writer in this version of mgpr; models of task "
            f"{', '.join(sorted(TASKS))} can run"
        ) from None


__all__ = ["TASKS", "Task", "TaskContext", "TileOutcome", "get_task"]
