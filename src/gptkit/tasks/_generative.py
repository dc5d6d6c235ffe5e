"""Shared by translate and summarize: a causal LM trained on "prompt + target + EOS" with the loss on
the target only, evaluated by generating from the prompt. The tasks differ in fields, prompt and metric."""

from __future__ import annotations

import logging

import torch

from gptkit.errors import UserError

log = logging.getLogger(__name__)


class Examples:
    """Tokenized examples; ``batch`` right-pads them (token labels, where rows have them, with -100)."""

    def __init__(self, rows: list[dict[str, list[int]]], pad_id: int):
        self.rows, self.pad_id = rows, pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: list[int], epochs: list[int] | None = None) -> dict:
        rows = [self.rows[i] for i in indices]
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[j, :n], mask[j, :n] = torch.tensor(r["input_ids"]), 1
            if "labels" in r:
                labels[j, :n] = torch.tensor(r["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def render(template: str, row: dict, field: str = "finetune.prompt") -> str:
    try:
        return template.format(**row)
    except KeyError as e:
        raise UserError(f"{field}: the template names {{{e.args[0]}}}, which the rows do not have "
                        f"(fields: {sorted(row)})") from None


def build_model(recipe, tokenizer, train_rows):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(recipe.model.init_from, attn_implementation=recipe.model.attn_implementation)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def preprocess(recipe, tokenizer, rows, split, *, template: str, target: str) -> Examples:
    """prompt tokens (label -100) + target tokens + EOS; cut to finetune.max_length, cuts counted."""
    limit = min(recipe.finetune.max_length, _context(recipe, tokenizer))
    out, cut = [], 0
    for row in rows:
        prompt = tokenizer(render(template, row), add_special_tokens=False)["input_ids"]
        answer = tokenizer(str(row[target]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt) + len(answer) > limit:
            cut += 1
            answer = answer[: max(1, limit // 2)] if len(answer) > limit // 2 else answer
            prompt = prompt[-(limit - len(answer)) :]
        out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    if cut:
        log.warning("%s: %d of %d examples longer than %d tokens were truncated (finetune.max_length)",
                    split, cut, len(rows), limit)
    return Examples(out, tokenizer.pad_token_id)


def _context(recipe, tokenizer) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(recipe.model.init_from)
    return int(getattr(cfg, "n_positions", None) or cfg.max_position_embeddings)


def loss(model, batch: dict) -> torch.Tensor:
    """Mean over examples of each example's mean target-token loss: independent of padding and batching."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    tok = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    mask = labels != -100
    return ((tok * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def predict(model, tokenizer, rows, recipe, *, template: str) -> list[str]:
    from gptkit.generation import decoding_from, generate_batch

    opts = decoding_from(recipe.finetune, recipe.train.seed)
    prompts = [render(template, r) for r in rows]
    return [outs[0].strip() for outs in generate_batch(model, tokenizer, prompts, opts, batch_size=32)]


def bind(default_prompt: str, target: str):
    """``preprocess`` and ``predict`` of a generative task whose prompt defaults to ``default_prompt``
    (``finetune.prompt`` wins) and whose answer is the row's ``target`` field."""

    def template(recipe) -> str:
        return recipe.finetune.prompt or default_prompt

    def bound_preprocess(recipe, tokenizer, rows, split, model=None):
        return preprocess(recipe, tokenizer, rows, split, template=template(recipe), target=target)

    def bound_predict(model, tokenizer, rows, recipe):
        return predict(model, tokenizer, rows, recipe, template=template(recipe))

    return bound_preprocess, bound_predict
