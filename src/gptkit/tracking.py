"""Run bookkeeping: metrics.jsonl, TensorBoard, and the end-of-run loss/LR plot (main process only)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class Tracker:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        except ImportError:  # tensorboard is a dependency, but never fail a run over a log
            log.warning("tensorboard not installed; metrics go to metrics.jsonl only")

    def _truncate_after(self, step: int) -> None:
        """Drop lines a killed run logged after the checkpoint we resume from."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k.replace("_", "/", 1), v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def plot(run_dir: Path) -> Path | None:
    """``loss.png``: train and validation loss (left) and learning rate (right) against step."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax_loss.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None, markersize=3)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend()
    lr = [(r["step"], r["train_lr"]) for r in rows if "train_lr" in r]
    if lr:
        ax_lr.plot(*zip(*lr))
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
