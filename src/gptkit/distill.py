"""Knowledge distillation (``distill:`` in a recipe, ``gptkit distill RECIPE``): the student — the recipe's model, built
from its size spec or ``model.init_from`` — learns the teacher's softened next-token distributions beside the data.

Per target token: ``(1 - alpha) * CE(student, label) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``
(Hinton et al.; T^2 keeps the soft term's gradients on the scale of the hard one's). It is a loss function handed to
the one training loop (:func:`gptkit.engine.fit`): the teacher runs in eval mode without gradients inside the same
autocast as the student (same precision rules); being fixed and dropout-free, it keeps resume exact. Validation
loss stays the plain cross-entropy, so a distilled student and one trained without a teacher compare directly.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from gptkit import modeling
from gptkit.errors import UserError

log = logging.getLogger(__name__)

TASKS = ("pretrain", "translate", "summarize", "qa", "multitask")


def check_teacher(recipe: Any, tokenizer: Any | None) -> str:
    """Every check :func:`load_teacher` makes before it reads the teacher's weights (``gptkit validate`` runs them
    too): the recipe's task can be distilled, the teacher is a run or model folder (or a cached hub id) with a
    config, a language model rather than a task head, with the student's ``tokenizer`` (None: not trained yet,
    so compared when the run trains it). Reads configs and tokenizers only; returns what validate prints."""
    from gptkit import hub, rundir, trained

    cfg = recipe.distill
    if recipe.task not in TASKS or recipe.task == "qa" and recipe.finetune.qa_mode == "extractive":
        raise UserError(f"distill.teacher: distillation works for pretrain and the generative tasks, not {recipe.task}"
                        f"{' (extractive)' if recipe.task == 'qa' else ''}")
    path = hub.resolve(cfg.teacher, "distill.teacher", weights=True).path
    run, home = rundir.run_of(path)
    if run is not None and trained.has_head(run.task, run):
        raise UserError(f"distill.teacher: {cfg.teacher} is a {run.task} model with a task head; the teacher must be "
                        "a language model")
    if not (path / "config.json").is_file() and not (run is not None and trained.is_adapter_dir(path)):
        raise UserError(f"distill.teacher: {cfg.teacher} has no config.json; expected a gptkit run or a model folder "
                        "written by save_pretrained")
    teacher_tok = trained.tokenizer_of(home, "distill.teacher")
    if tokenizer is None:
        same = f"its tokenizer ({len(teacher_tok)} tokens) is compared with the student's once that is trained"
    elif teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"distill.teacher: its tokenizer ({len(teacher_tok)} tokens) is not the student's "
                        f"({len(tokenizer)}); give the student the teacher's tokenizer (tokenizer.kind: pretrained, "
                        f"tokenizer.path: {cfg.teacher}) or a base trained with it")
    else:
        same = f"the student's tokenizer ({len(tokenizer)} tokens)"
    shape = ""
    if (path / "config.json").is_file():
        config = modeling.base_config(str(path), "distill.teacher")
        _check_fits(recipe, config)
        shape = f"{modeling.describe_arch(config)}, {modeling.meta_param_count(config):,} parameters, "
    return f"{cfg.teacher}: {shape}{same}; T {cfg.temperature:g}, alpha {cfg.alpha:g}"


def _check_fits(recipe: Any, teacher: Any) -> None:
    """The teacher reads what the student trains on: the same kind of model (an encoder-decoder's soft targets for a
    decoder-only student's sequences, or the reverse, mean nothing), and sequences within its positions (past them
    its position embedding fails mid-training)."""
    cfg = recipe.distill
    student = None  # pretraining: a decoder-only GPT of model.context positions
    if recipe.task != "pretrain" and recipe.model.init_from:
        student = modeling.base_config(recipe.model.init_from, "model.init_from", recipe.model.trust_remote_code)
    kind = {True: "an encoder-decoder", False: "a decoder-only model"}
    ours, theirs = student is not None and modeling.is_encoder_decoder(student), modeling.is_encoder_decoder(teacher)
    if ours != theirs:
        raise UserError(f"distill.teacher: {cfg.teacher} is {kind[theirs]} ({teacher.model_type}) but the student is "
                        f"{kind[ours]}; the teacher must be the same kind of model")
    if recipe.task == "pretrain":
        length, field = recipe.model.context, "model.context"
    else:  # finetune.max_length within the student's own positions (gptkit.tasks.generative._limit)
        length, field = recipe.finetune.max_length, "finetune.max_length"
        length = min(length, (modeling.max_positions(student) if student is not None else None) or length)
    positions = modeling.max_positions(teacher)
    if positions and positions < length:
        raise UserError(f"distill.teacher: {cfg.teacher} reads at most {positions} positions but the student trains on "
                        f"{length}-token sequences ({field}); lower {field} to {positions} or use a teacher with a "
                        "longer context")


def validate_line(recipe: Any, train_files: list[str] | None) -> str | None:
    """``gptkit validate``'s teacher line: :func:`check_teacher` against the student's tokenizer, the base's
    (fine-tuning, ``train_files`` None) or the pretraining one when it exists already (never trained here); None
    without a teacher."""
    if not recipe.distill.teacher:
        return None
    from gptkit import pretrain, trained

    if train_files is None:
        student = trained.tokenizer_of(recipe.model.init_from or "", "model.init_from", recipe.model.trust_remote_code)
    else:
        student = pretrain.existing_tokenizer(recipe, train_files)
    return check_teacher(recipe, student)


def load_teacher(recipe: Any, tokenizer: Any, device: torch.device) -> Any:
    """The teacher of ``recipe.distill``, frozen on ``device``, after :func:`check_teacher`."""
    from gptkit import trained

    cfg = recipe.distill
    check_teacher(recipe, tokenizer)
    model, _, _ = trained.load_any(cfg.teacher, "distill.teacher")
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("distill: teacher %s (%.2fM parameters), T=%g, alpha=%g", cfg.teacher,
             sum(p.numel() for p in model.parameters()) / 1e6, cfg.temperature, cfg.alpha)
    return model


def loss_fn(where_fn: Callable, teacher: Any, temperature: float, alpha: float,
            weights_fn: Callable | None = None, smoothing: float = 0.0) -> Callable[[Any, dict], torch.Tensor]:
    """A summed training loss for the engine: ``where_fn(batch) -> (keep, targets, inputs)`` says which positions
    are scored, against what, and the models' inputs; ``weights_fn(batch)`` weighs each scored position (None:
    1); ``smoothing`` is the label smoothing of the cross-entropy part. Both models' output layers run on the
    scored positions only, fused with the loss, where they allow
    (:func:`gptkit.modeling.scored_cross_entropy`)."""

    def distilled(model, batch: dict) -> torch.Tensor:
        keep, targets, inputs = where_fn(batch)
        return modeling.scored_cross_entropy(model, keep, targets, weights_fn(batch) if weights_fn else None,
                                             teacher=teacher, temperature=temperature, alpha=alpha,
                                             smoothing=smoothing, **inputs)

    return distilled
