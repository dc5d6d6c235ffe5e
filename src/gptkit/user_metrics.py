"""Metrics users bring: Hugging Face ``evaluate`` modules from a local script or folder (or a name the local
evaluate cache holds), computed beside the built-in figures by ``gptkit eval --metric`` and by fine-tuning
(``finetune.extra_metrics``), where one can pick the best checkpoint (``finetune.metric: val_<key>``).

The built-in metrics call sacrebleu and rouge-score directly: ``evaluate.load("sacrebleu")`` would fetch a
script from the hub. A module is checked when loaded — it loads, and it computes on two references given as
predictions — so a broken one stops a run before training, in one line. Each float its ``compute`` returns
(a Python or numpy number: modules often return ``np.float64``) becomes a figure named ``<key>`` when the key starts with the module name, else ``<module name>_<key>`` (also
when ``<key>`` is a built-in figure's name: a module never replaces one); where it came from (name, source, SHA-256 of its code, evaluate's version) is recorded with the results.
"""

from __future__ import annotations

import hashlib
import logging
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptkit.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class UserMetric:
    source: str
    name: str
    sha256: str | None
    module: Any

    def record(self) -> dict:
        from importlib.metadata import version

        return {"name": self.name, "source": self.source, "sha256": self.sha256, "evaluate": version("evaluate")}


def _digest(path: Path) -> str:
    files = [path] if path.is_file() else sorted(path.rglob("*.py"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def load(sources: list[str], field: str, references: list | None = None) -> list[UserMetric]:
    """The modules named in ``sources``; ``references`` (a few golds of the task) check that each computes."""
    if not sources:
        return []
    try:
        import evaluate
    except ImportError:
        raise UserError(f"{field}: custom metrics need the evaluate package: pip install 'gptkit[metrics]'") from None
    out: list[UserMetric] = []
    for src in sources:
        path = Path(src).expanduser()
        if not path.exists() and (src.endswith(".py") or src.startswith((".", "/", "~"))):
            raise UserError(f"{field}: '{src}' not found; expected an evaluate metric script (.py) or its folder")
        try:
            module = evaluate.load(str(path.resolve()) if path.exists() else src)
        except Exception as e:  # evaluate raises whatever the script raises
            raise UserError(f"{field}: cannot load '{src}' as an evaluate module ({_first_line(e)})") from None
        metric = UserMetric(src, module.name, _digest(path) if path.exists() else None, module)
        if any(m.name == metric.name for m in out):
            raise UserError(f"{field}: two modules are both named '{metric.name}'")
        if references:
            sample = list(references[:2])
            compute([metric], [r[0] if isinstance(r, list) else r for r in sample], sample)
        out.append(metric)
    return out


def compute(metrics: list[UserMetric], predictions: list, references: list, taken=()) -> dict[str, float]:
    """Every float each module returns on (predictions, references), named as the module docstring says; a name
    ``taken`` by a built-in figure (a module named ``accuracy`` returning ``accuracy``) or by an earlier module's is
    ``<module name>_<key>`` instead, never a silent replacement."""
    figures: dict[str, float] = {}
    for m in metrics:
        try:
            result = m.module.compute(predictions=list(predictions), references=list(references)) or {}
        except Exception as e:
            raise UserError(f"{m.source}: the evaluate module '{m.name}' failed to compute ({_first_line(e)})") from None
        for key, value in result.items():
            value = value.item() if _numpy_scalar(value) else value  # np.float64(0.5), np.array(3): plain numbers
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                log.info("%s: '%s' is not a number (%s); not a figure", m.name, key, type(value).__name__)
            else:
                name = key if key.startswith(m.name) else f"{m.name}_{key}"
                name = f"{m.name}_{key}" if name in taken or name in figures else name
                if name in taken or name in figures:
                    raise UserError(f"{m.source}: the evaluate module '{m.name}' returns '{key}', a figure another "
                                    "metric already has; rename the module (its figures are named after it)")
                figures[name] = float(value)
    return figures


def _numpy_scalar(value) -> bool:
    """A numpy scalar or 0-d array (evaluate modules compute with numpy); numpy itself is not imported for it."""
    return type(value).__module__ == "numpy" and getattr(value, "shape", None) == () and hasattr(value, "item")
