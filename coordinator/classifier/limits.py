"""What the classifier accepts, shared by the model, the API and the CLI.

Kept free of numpy/onnxruntime so the CLI can check its input (and the API
its requests) without loading the model.
"""

from __future__ import annotations

MAX_TEXT_CHARS = 4000
MAX_BATCH = 256


class InvalidTask(ValueError):
    """A description the classifier refuses: not text, empty, or too long."""


class TaskTooLong(InvalidTask):
    """A description over MAX_TEXT_CHARS (the API answers 413 for it)."""


def check_text(text: object, where: str = "text") -> str:
    if not isinstance(text, str):
        raise InvalidTask(f"{where}: expected a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidTask(f"{where}: empty task description")
    if len(text) > MAX_TEXT_CHARS:
        raise TaskTooLong(f"{where}: task description too long ({len(text)} characters, "
                          f"at most {MAX_TEXT_CHARS})")
    return text
