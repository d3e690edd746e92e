"""Diagnostics: every user-facing problem with the place in the recipe it comes from.

A diagnostic is printed as ``file:line:col: error: path: message`` followed by an
indented ``hint:`` line. Problems are collected and reported together; the CLI
exits with code 2 when any error is present.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Origin:
    """Where a value came from: a file position, or the command line."""

    file: str
    line: int = 0
    col: int = 0
    command_line: str | None = None  # the --set text, when the value came from there

    def __str__(self) -> str:
        if self.command_line is not None:
            return f"command line (--set {self.command_line})"
        if self.line:
            return f"{self.file}:{self.line}:{self.col}"
        return self.file


@dataclass
class Diagnostic:
    path: str
    message: str
    origin: Origin | None = None
    hint: str | None = None
    severity: str = "error"

    def format(self) -> str:
        where = str(self.origin) if self.origin else "<recipe>"
        head = f"{where}: {self.severity}: {self.path}: {self.message}" if self.path else f"{where}: {self.severity}: {self.message}"
        if self.hint:
            head += f"\n    hint: {self.hint}"
        return head


@dataclass
class RecipeError(Exception):
    """Raised with all problems found in one stage; the CLI prints them and exits 2."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(d.format() for d in self.diagnostics)


class UserError(Exception):
    """Any other error caused by what the user asked (bad flag, missing run directory...).

    The CLI prints the message (and hint) without a traceback and exits with ``code``.
    """

    def __init__(self, message: str, hint: str | None = None, code: int = 1):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


# what users of other tools write for malt's words (checked before spelling: "gpu" is closer to "tpu" than to "cuda")
SYNONYMS = {
    "gpu": "cuda", "nvidia": "cuda", "xla": "tpu",
    "clm": "causal_lm", "lm": "causal_lm", "causal": "causal_lm", "next_token": "causal_lm", "gpt": "causal_lm",
    "a100": "a100-80gb", "h100-sxm": "h100", "v5e": "tpu-v5e", "v5p": "tpu-v5p", "v4": "tpu-v4",
    "adam": "adamw", "fp16": "bf16", "bfloat16": "bf16", "float32": "fp32", "mixed": "bf16",
    "zero3": "fsdp", "zero": "fsdp", "fsdp2": "fsdp", "data_parallel": "ddp",
    "true": "on", "yes": "on", "false": "off", "no": "off",
}


def did_you_mean(word: str, choices) -> str | None:
    import difflib

    if word is None:  # a null where a choice was expected: nothing to correct
        return None
    choices = [str(c) for c in choices]
    known = SYNONYMS.get(str(word).lower())
    if known in choices:
        return known
    match = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return match[0] if match else None
