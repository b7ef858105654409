"""Data sets and tasks. Each module owns how its data is prepared and how a model is scored on it:

    COMMANDS      {prepare_data.py command: help}
    add_arguments(parser, command)          the command's own flags
    prepare(command, args, out_dir)         writes the data set, returns its directory
    SCORES        {evaluate.py --task name: help}
    score(task, model, tokenizer, meta, split, indices, accelerator, batch_size)
                                            -> (result fields, one-line summary)
    val_metrics(meta, tokenizer, val_split, samples)
                                            -> what each evaluation in training adds to the val
                                               loss, as fn(model, accelerator) -> {name: value}
    CHECKPOINT_METRIC                       the val score that ranks a run's checkpoints
                                            (val_loss; classifiers: val_accuracy)

A new data set or task is one new module added to MODULES.
"""

from types import ModuleType

from gptlab.errors import UserError
from gptlab.tasks import arithmetic, chat, classify, text

MODULES: tuple[ModuleType, ...] = (text, arithmetic, chat, classify)


def for_command(command: str) -> ModuleType:
    """The module that prepares data set `command` (prepare_data.py)."""
    return next(module for module in MODULES if command in module.COMMANDS)


def all_scores() -> dict[str, str]:
    return {name: help for module in MODULES for name, help in module.SCORES.items()}


def for_score(task: str) -> ModuleType:
    """The module that scores `--task task` (evaluate.py)."""
    for module in MODULES:
        if task in module.SCORES:
            return module
    raise UserError(f"unknown task {task!r}; choose one of: {', '.join(all_scores())}")


def for_data_set(meta: dict) -> ModuleType:
    """The module whose data set this is (by the meta.json of a prepared set)."""
    if "chat" in meta:
        return chat
    if meta.get("format") == "classify":
        return classify
    return arithmetic if "task" in meta else text
