"""The data checks of ``paca train``'s preflight: everything about ``--data``, ``--eval-data`` and their flags that
needs no weights, so a bad file, column or flag fails in the first second rather than after the model loads.

Two stages, as the preflight learns things: :func:`check_training_data` (the files: every record, the columns the
flags name, the split, flags that do nothing) and :func:`check_data_for_model` (once the model folder is known: a
chat template for conversations, and an architecture whose attention can keep packed examples apart).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import PacaConfigError
from .base import DataError
from .fields import FieldMap, parse_field_map


@dataclass
class DataPlan:
    """What the data checks found: the field map, what ``--data`` holds, the warnings for flags that do nothing."""

    fields: FieldMap
    kind: str
    forms: dict[str, int]
    records: int
    eval_forms: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: What the conversations (of --data and --eval-data) need of a chat template, with where each first appears.
    chat_features: dict[str, str] = field(default_factory=dict)

    @property
    def has_conversations(self) -> bool:
        return bool(self.forms.get("conversation") or self.eval_forms.get("conversation"))

    def note(self, packing: bool) -> str:
        """`` (40 conversation records, packed)`` for the run's description."""
        forms = ", ".join(f"{count} {form}" for form, count in self.forms.items())
        return f" ({forms} record{'s' if self.records != 1 else ''}{', packed' if packing else ''})" if self.kind != "txt" else ""


def check_training_data(data_path: Path, eval_data_path: Path | None, *, split: str, split_given: bool, text_field: str | None,
                        field_map: str | None, packing: bool) -> DataPlan:
    """The data files and their flags, checked without a tokenizer; raises on the first problem with one line."""
    from ..dataset import inspect_data

    fields = parse_field_map(field_map, text_field)
    summary = inspect_data(data_path, "--data", split=split, fields=fields)
    plan = DataPlan(fields, summary.kind, summary.forms, summary.records, chat_features=dict(summary.chat_features))
    if eval_data_path is not None:
        held_out = inspect_data(eval_data_path, "--eval-data", split=None, fields=fields)
        plan.eval_forms = held_out.forms
        for feature, where in held_out.chat_features.items():
            plan.chat_features.setdefault(feature, where)
    if split_given and not (data_path.is_dir() and (data_path / "dataset_dict.json").is_file()):
        plan.warnings.append(f"--data-split {split} does nothing: --data {data_path} holds a single split")
    if summary.kind == "txt" and fields.columns:
        plan.warnings.append("--text-field/--field-map do nothing with plain text (.txt)")
    if summary.kind == "txt" and packing:
        plan.warnings.append("--packing does nothing with plain text (.txt): it is already cut into full --seq-len rows")
    return plan


def check_data_for_model(plan: DataPlan, model_folder: str | Path, packing: bool) -> None:
    """What the model folder says about this data, before its weights load: conversations need the tokenizer's chat
    template; packing needs an architecture whose attention mask follows packed position ids."""
    folder = Path(model_folder)
    if plan.has_conversations and _has_tokenizer_files(folder) and not _has_chat_template(folder):
        raise DataError(f"the data holds conversations ('messages' or prompt/completion message lists), and the tokenizer in "
                        f"{folder} has no chat template to render them: use an instruct model's folder, or write the data as "
                        "'prompt'/'response' strings.")
    if plan.chat_features and _has_tokenizer_files(folder):
        check_template_knows(plan.chat_features, _template_text(folder), folder)
    if packing:
        from .packing import packing_problem_before_loading

        problem = packing_problem_before_loading(folder)
        if problem is not None:
            raise PacaConfigError(f"--packing cannot keep examples apart on {folder}: {problem}. Drop --packing (examples are "
                                  "then padded to --seq-len instead).")


#: Roles every chat template is written for (OpenAI's and TRL's conversations); others must be named by the template.
STANDARD_ROLES = ("system", "user", "assistant", "tool")


def check_template_knows(features: dict[str, str], template: str | None, folder: Path) -> None:
    """Each role the conversations use is one the chat template names (or a standard one), and tool calls are something it
    renders: a template renders an unknown role as plain text (trained silently on a turn it never saw) and fails on a
    tool-call turn without content with a bare Jinja error. One line naming the record."""
    if not template:
        return
    for feature, where in features.items():
        if feature.startswith("role:"):
            role = feature[len("role:"):]
            if role not in STANDARD_ROLES and f"'{role}'" not in template and f'"{role}"' not in template:
                raise DataError(f"{where} has role {role!r}, which the chat template in {folder} does not know (the roles it knows: "
                                f"{', '.join(_template_roles(template)) or ', '.join(STANDARD_ROLES)}); rename it to one of those.")
        elif feature == "tool_calls" and "tool_calls" not in template:
            raise DataError(f"{where} is a tool-call turn (tool_calls), and the chat template in {folder} does not render tool "
                            "calls; give the turn a 'content' string, or use a model whose template renders tools.")


def _template_roles(template: str) -> list[str]:
    """The usual role names a template quotes (to tell the user which it knows)."""
    return [role for role in STANDARD_ROLES + ("developer", "ipython", "function") if f"'{role}'" in template or f'"{role}"' in template]


def _template_text(folder: Path) -> str | None:
    """The chat template saved with a tokenizer (chat_template.jinja, chat_template.json, or tokenizer_config.json's key)."""
    try:
        if (folder / "chat_template.jinja").is_file():
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if (folder / "chat_template.json").is_file():
            template = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        else:
            template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file()


def _has_chat_template(folder: Path) -> bool:
    """A chat template saved with the tokenizer: ``chat_template.jinja`` (transformers >= 4.52), ``chat_template.json``,
    a folder of named templates, or the ``chat_template`` key of tokenizer_config.json (older saves)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    if (folder / "additional_chat_templates").is_dir():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return True  # unreadable here: loading the tokenizer says what is wrong
