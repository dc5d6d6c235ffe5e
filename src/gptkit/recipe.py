"""The recipe: one typed schema for every run.

A recipe is a YAML file whose keys are validated by the pydantic models below. Every field is
documented here, once, with its default; ``gptkit validate`` and the README refer back to it.
Unknown keys and wrong types are refused with one line naming the file, the field path, what was
expected and the closest valid key. A recipe may start with ``extends: other.yaml`` (resolved against
its own folder) and state only what differs; ``key.path=value`` overrides from the command line are
applied last and typed by the schema.

Path rule: relative *input* paths (data files, tokenizer and model directories) resolve against the
folder of the recipe file that names them. ``output.dir`` resolves against the working directory, so a
bundled recipe never writes inside the installed package.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gptkit.errors import UserError


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000; '2GiB' -> 2 * 2**30; a plain number is bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"expected a size such as 500MB or 2GB, got '{text}'")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _takes_bool(annotation) -> bool:
    return annotation is bool or annotation is Any or any(_takes_bool(a) for a in get_args(annotation))


class _Section(BaseModel):
    # a float field is a finite number: lr .inf or weight_decay .nan would pass the bounds (or every comparison)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _not_a_boolean(cls, value, info):
        """true/false where a number or text is expected (pydantic reads true as 1: eval_every: true was every step)."""
        annotation = cls.model_fields[info.field_name].annotation if info.field_name else bool
        if isinstance(value, bool) and not _takes_bool(annotation):
            kinds = [k for k in (annotation, *get_args(annotation)) if k in (int, float, str)]
            if kinds:  # (a Literal's own message lists its choices)
                raise ValueError(f"expected {({int: 'an integer', float: 'a number', str: 'text'})[kinds[0]]}, got "
                                 f"{str(value).lower()}")
        return value


class ModelConfig(_Section):
    """The network: built from a size spec (random init) or continued from a local checkpoint."""

    arch: Literal["gpt2", "llama", "bart", "t5"] = Field(
        "gpt2", description="Architecture family (transformers config class); bart and t5 are encoder-decoders, "
        "built untrained by `gptkit init` and trained by `gptkit finetune` (translate, summarize)."
    )
    init_from: str | None = Field(
        None, description="Checkpoint to continue from: a local directory or a Hugging Face hub id "
        "(org/name[@revision], from the local cache; downloaded once unless HF_HUB_OFFLINE=1); overrides the size spec."
    )
    n_layer: int = Field(4, ge=1, le=256, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads per block.")
    n_kv_head: int | None = Field(None, ge=1, description="Key/value heads (llama only; None = n_head).")
    n_embd: int = Field(128, ge=1, description="Hidden width; must be divisible by n_head.")
    intermediate_size: int | None = Field(None, ge=1, description="Feed-forward width (None = 4 x n_embd).")
    context: int = Field(256, ge=2, description="Context length in tokens (block size for packing).")
    dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="Dropout on embeddings, attention and residuals (None: 0 for a new model; "
        "with init_from the base's own, else this sets every dropout field of the base's config)."
    )
    vocab_multiple: int = Field(
        1, ge=1, description="A new model's embedding and output layer padded to a multiple of this (64 or 128 "
        "speeds GPU matmuls, as nanoGPT's 50304 for GPT-2); the extra ids are never targets, generation suppresses them."
    )
    tie_embeddings: bool = Field(True, description="Share input embedding and output projection weights.")
    activation: Literal["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"] | None = Field(
        None,
        description="Feed-forward activation (None: exact gelu for gpt2, as nanoGPT — one fused kernel, unlike "
        "GPT-2's original gelu_new; silu for llama).",
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped inside init_from / tokenizer.path (only for folders you trust)."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel; sdpa uses torch's fused scaled-dot-product attention."
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Weights of init_from load in this dtype (auto: as saved), so a large base never "
        "materialises in fp32 first. With LoRA the frozen base stays in it and the adapters train in fp32; full "
        "fine-tuning in bfloat16 keeps no fp32 master weights."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.init_from is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.init_from is None and self.arch == "llama":  # grouped-query attention and rotary embeddings
            if self.n_kv_head is not None and self.n_head % self.n_kv_head:
                raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
            if self.n_embd // self.n_head % 2:
                raise ValueError(f"a llama head needs an even width for its rotary embedding; n_embd / n_head = "
                                 f"{self.n_embd // self.n_head}")
        return self


class TokenizerConfig(_Section):
    """How text becomes tokens: trained on the corpus, or loaded from a local directory."""

    kind: Literal["bpe", "char", "pretrained"] = Field(
        "bpe", description="bpe: train byte-level BPE; char: one token per character; pretrained: load `path`."
    )
    vocab_size: int = Field(8192, ge=260, description="Target vocabulary size for bpe (ignored for char).")
    path: str | None = Field(None, description="Tokenizer directory or hub id (kind: pretrained).")
    train_bytes: int = Field(
        256_000_000, ge=1_000_000, description="bpe/char: train on a seeded sample of this many bytes of the corpus "
        "(all of it when smaller); a number or a size such as 500MB or 2GB."
    )

    @field_validator("train_bytes", mode="before")
    @classmethod
    def _size(cls, v: object) -> object:
        return parse_size(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _path_for_pretrained(self) -> TokenizerConfig:
        if self.kind == "pretrained" and not self.path:
            raise ValueError("kind 'pretrained' needs tokenizer.path (a local tokenizer directory)")
        return self


class DataConfig(_Section):
    """Local corpus files; validation from a held-out fraction or from its own files."""

    train_files: list[str] = Field(
        default_factory=list, description="Files or globs: .txt, .jsonl/.json, .csv, .parquet (formats may mix)."
    )
    val_files: list[str] = Field(default_factory=list, description="Validation files; empty = hold out val_fraction.")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Tail fraction of the token stream held out.")
    text_column: str | list[str] = Field(
        "text", description="Column(s) holding the text in jsonl/csv/parquet files; each listed column is a document."
    )
    sample_by: Literal["document", "paragraph", "line"] = Field(
        "document", description="For .txt: what one document is (EOS goes between documents)."
    )
    test_files: list[str] = Field(default_factory=list, description="Test split (finetune: scored after training).")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Finetune: task field -> column in the files, e.g. {text: sentence, label: sentiment}.",
    )
    cache_dir: str | None = Field(
        None, description="Tokenized-data cache (None = $GPTKIT_CACHE or ~/.cache/gptkit)."
    )
    num_proc: int | None = Field(None, ge=1, description="Tokenization processes (None = every available core).")
    train_weights: list[float] | None = Field(
        None, description="Finetune: one weight per train_files entry: 2 = every row twice, 0.5 = a seeded half "
        "(e.g. real and back-translated pairs mixed 1 : 0.5)."
    )

    @model_validator(mode="after")
    def _weights_match_files(self) -> DataConfig:
        if self.train_weights is not None:
            if len(self.train_weights) != len(self.train_files):
                raise ValueError(f"train_weights has {len(self.train_weights)} entries for {len(self.train_files)} "
                                 "train_files; give one weight per entry")
            if any(w <= 0 for w in self.train_weights):
                raise ValueError("train_weights must be > 0")
        return self


LORA_LR = 1e-3  # train.lr's default for finetune.method: lora (3x the full default; tested on the learning tasks)


class TrainConfig(_Section):
    """The optimisation loop (shared by every command that trains)."""

    max_steps: int = Field(1000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Micro-batch size per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(3e-4, gt=0.0, description="Peak learning rate (AdamW); unset with finetune.method lora: 1e-3.")
    min_lr: float | None = Field(
        None, ge=0.0, description="Floor the schedule decays to (None: lr / 10, as nanoGPT; resolved, so the recipe "
        "saved with the run shows it)."
    )
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps from 0 to lr.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW decay; never applied to biases and norms.")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0.0, description="Max global gradient norm (0 = off).")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="Training targets (1 - e) one-hot + e / classes, as transformers' "
        "label_smoothing_factor; validation loss and perplexity stay plain cross-entropy."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on GPUs that support it, else fp32."
    )
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    seed: int = Field(1337, description="Seeds init, dropout and data order.")
    eval_every: int = Field(200, ge=1, description="Validate every N steps (and at the end).")
    eval_batches: int | None = Field(
        50, ge=1, description="Validation global batches (batch_size x processes x grad_accum examples) per evaluation, "
        "a fixed seeded sample of the split (None = all)."
    )
    full_final_eval: bool = Field(
        False, description="Score the whole validation split at the last step (sampled estimates before it; best/ is still judged on "
        "the sample, like with like)."
    )
    log_every: int = Field(10, ge=1, description="Log training metrics every N steps.")
    save_every: int = Field(500, ge=1, description="Checkpoint every N steps (and at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    skip_nonfinite: int = Field(0, ge=0, description="Batches with non-finite loss skipped before stopping.")
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers fed beside metrics.jsonl (always written); [] = metrics.jsonl only. "
                    "mlflow: sqlite store in the run directory unless MLFLOW_TRACKING_URI is set; wandb: offline "
                    "unless WANDB_MODE is set.",
    )

    @model_validator(mode="after")
    def _floor_below_peak(self) -> TrainConfig:
        if "min_lr" not in self.model_fields_set:  # a fixed default floor refused any lower lr (fine-tuning's 1e-5)
            self.__dict__["min_lr"] = float(f"{self.lr / 10:.12g}")  # 3e-4 -> 3e-05, not 2.9999999999999997e-05;
            # __dict__, not an assignment, which would validate (and resolve) again
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


class SubTask(_Section):
    """One task of a multi-task recipe (task: multitask): its data, prompt and sampling weight."""

    task: Literal["translate", "summarize", "qa"] = Field(description="A generative task.")
    weight: float = Field(1.0, gt=0.0, description="Share of training examples drawn from this task.")
    train_files: list[str] = Field(description="Training files or globs.")
    val_files: list[str] = Field(default_factory=list, description="Validation files (scored per task).")
    test_files: list[str] = Field(default_factory=list, description="Test files (scored per task).")
    columns: dict[str, str] = Field(default_factory=dict, description="Task field -> file column.")
    prompt: str | None = Field(None, description="Prompt template (None = the task's default).")


class FinetuneConfig(_Section):
    """Adapting a checkpoint (model.init_from) to a task: full or LoRA, what to keep, when to stop."""

    method: Literal["full", "lora"] = Field("full", description="Train every weight, or LoRA adapters (peft).")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    lora_targets: list[str] | None = Field(
        None, description="Module names to adapt (None = every linear layer of the blocks, as peft's all-linear)."
    )
    prompt: str | None = Field(
        None, description="Generative tasks: template with {field} slots (None = the task's default)."
    )
    max_length: int = Field(256, ge=8, description="Tokens per example (prompt + target); longer ones are cut.")
    loss: Literal["token", "example"] = Field(
        "token", description="Generative tasks: average the loss over the step's target tokens (as Trainer), or "
        "over examples (each example's mean token loss). Validation loss and perplexity are always per token."
    )
    metric: str | None = Field(None, description="Validation metric that picks the best checkpoint (None = task's).")
    metric_higher_is_better: bool | None = Field(
        None, description="Direction of finetune.metric (None: lower for val_loss/val_perplexity, higher otherwise)."
    )
    synthetic_tag: str | None = Field(
        None, description="translate: put this tag before the source of rows marked synthetic (tagged "
        "back-translation, e.g. '<BT>'), so the model can tell them from real pairs."
    )
    extra_metrics: list[str] = Field(
        default_factory=list, description="Hugging Face evaluate modules (a local .py or folder, or a name in the "
        "local evaluate cache) scored beside the task's metrics on validation and test; needs gptkit[metrics]."
    )
    patience: int | None = Field(None, ge=1, description="Early stopping: evaluations without improvement.")
    eval_examples: int | None = Field(
        200, ge=1, description="Validation examples scored per evaluation, per task in multitask (None = all)."
    )
    num_beams: int | None = Field(
        None, ge=1, description="Beam width when generating for evaluation (1 = greedy); None = 4, or 1 when sampling."
    )
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per example for evaluation.")
    do_sample: bool = Field(False, description="Sample when generating for evaluation (default greedy/beam).")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature (with do_sample).")
    top_k: int | None = Field(None, ge=1, description="Sample from the k likeliest tokens (with do_sample).")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass (with do_sample).")
    repetition_penalty: float = Field(1.0, gt=0.0, description="Penalty > 1 discourages repeated tokens.")
    tasks: list[SubTask] = Field(
        default_factory=list, description="task: multitask — the generative tasks trained into one model."
    )
    qa_mode: Literal["extractive", "generative"] = Field(
        "extractive", description="qa: predict a span of the context (start/end head), or generate the answer."
    )
    doc_stride: int = Field(64, ge=1, description="qa (extractive): token overlap between windows of a long context.")
    max_answer_tokens: int = Field(30, ge=1, description="qa (extractive): longest span considered.")
    no_answer: bool = Field(False, description="qa: some questions have no answer in their context (SQuAD v2: "
                            "answers.text is []); the model learns to answer nothing, scored by the SQuAD v2 script.")
    null_score_diff_threshold: float = Field(
        0.0, description="qa (extractive, no_answer): answer nothing when the no-answer score beats the best span's by "
                         "more than this (run_qa's setting).")
    rouge_tokenizer: Literal["default", "unicode"] = Field(
        "default", description="summarize: ROUGE tokenizer; default = rouge_score's (English), unicode = any script."
    )


class DistributedConfig(_Section):
    """How several processes share the model (`accelerate launch` / `torchrun`); one process ignores it."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="ddp: a replica per process (or what an `accelerate launch --config_file` sets up); fsdp: "
        "shard weights, gradients and optimizer state (FSDP2, GPUs and CPU/gloo); deepspeed: ZeRO (GPUs)."
    )
    reshard_after_forward: bool = Field(
        True, description="fsdp: free gathered weights after each block's forward (full shard); false keeps them "
        "until backward (faster, more memory: ZeRO-2-like)."
    )
    cpu_offload: bool = Field(False, description="fsdp: keep sharded parameters and optimizer state in CPU memory.")
    replicas: int = Field(
        1, ge=1, description="fsdp: hybrid sharding: shard within groups of processes/replicas (typically a node), "
        "replicate across the groups."
    )
    deepspeed_config: str | None = Field(
        None, description="deepspeed: a ZeRO JSON config (recipes/accelerate/deepspeed/zero2.json or zero3.json; "
        "\"auto\" values are filled from the recipe)."
    )

    @model_validator(mode="after")
    def _config_for_deepspeed(self) -> DistributedConfig:
        if self.strategy == "deepspeed" and not self.deepspeed_config:
            raise ValueError("strategy 'deepspeed' needs distributed.deepspeed_config (a ZeRO JSON file, e.g. "
                             "recipes/accelerate/deepspeed/zero2.json)")
        return self


class DistillConfig(_Section):
    """Knowledge distillation: the recipe's model (the student) also learns the teacher's next-token
    distributions: loss = (1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher_T || student_T) per target token.
    Pretraining and the generative tasks (translate, summarize, generative qa, multitask); `gptkit distill RECIPE`."""

    teacher: str | None = Field(
        None, description="Teacher: a gptkit run or model folder (or hub id) with the student's tokenizer; None = off."
    )
    temperature: float = Field(2.0, gt=0.0, description="T: softens both distributions; the KL term is scaled by T^2.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the teacher's term (0 = plain training).")


class OutputConfig(_Section):
    """Where the run directory goes."""

    dir: str = Field("runs/default", description="Run directory (relative to the working directory).")

    @field_validator("dir")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():  # an empty path is the working directory: a run would be written (and replaced) there
            raise ValueError("expected a folder for the run such as runs/my-run, got an empty path")
        return v


class Recipe(_Section):
    """A whole run. Sections: model, tokenizer, data, train, finetune, distributed, output."""

    description: str = Field("", description="One line shown by `gptkit recipes`.")
    task: Literal["pretrain", "classify", "qa", "translate", "summarize", "multitask"] = Field(
        "pretrain", description="What the run does: pretrain, or a finetune task (`--task` on the command line wins)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _lora_learning_rate(self) -> Recipe:
        """LoRA's low-rank updates learn with a larger step than full fine-tuning: unless the recipe sets
        train.lr, a LoRA fine-tune uses LORA_LR (resolved here, so the recipe saved with the run shows it)."""
        if self.finetune.method == "lora" and "lr" not in self.train.model_fields_set:
            self.train.lr = LORA_LR  # validated again: a default min_lr follows it (lr / 10)
            self.train.model_fields_set.add("lr")
        return self


# --------------------------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"{path}: recipe file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a YAML recipe file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); expected a YAML recipe") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read recipe ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}:{where}: YAML syntax error: {problem}") from None
    if data is None:
        raise UserError(f"{path}: recipe is empty; expected a mapping of sections (model, data, train, ...)")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


# Input-path fields, resolved against the folder of the file that names them.
_PATH_FIELDS = {("model", "init_from"), ("tokenizer", "path"), ("data", "cache_dir"), ("distill", "teacher"),
                ("distributed", "deepspeed_config")}
_PATH_LIST_FIELDS = {("data", "train_files"), ("data", "val_files"), ("data", "test_files"), ("finetune", "extra_metrics")}


# a folder, or a hub id (org/name[@revision]); extra_metrics: a script, or a name in the local evaluate cache
_MODEL_FIELDS = {("model", "init_from"), ("tokenizer", "path"), ("finetune", "extra_metrics"), ("distill", "teacher")}


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    from gptkit.hub import is_hub_id

    def fix(p: Any, hub_ok: bool = False) -> Any:
        if not isinstance(p, str) or not p:
            return p
        p = str(Path(p).expanduser())
        if Path(p).is_absolute():
            return p
        local = base / p
        return p if hub_ok and not local.exists() and is_hub_id(p) else str(local.resolve())

    for sec, key in _PATH_FIELDS | _PATH_LIST_FIELDS:
        section = raw.get(sec)
        if isinstance(section, dict) and key in section:
            v = section[key]
            hub_ok = (sec, key) in _MODEL_FIELDS
            section[key] = [fix(x, hub_ok) for x in v] if isinstance(v, list) else fix(v, hub_ok)
    subtasks = (raw.get("finetune") or {}).get("tasks") if isinstance(raw.get("finetune"), dict) else None
    for sub in subtasks if isinstance(subtasks, list) else []:
        for key in ("train_files", "val_files", "test_files"):
            if isinstance(sub, dict) and isinstance(sub.get(key), list):
                sub[key] = [fix(x) for x in sub[key]]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(p.name for p in (*seen, path))
        raise UserError(f"{path}: extends forms a cycle ({chain})")
    raw = _read_yaml(path)
    _resolve_paths(raw, path.parent)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise UserError(f"{path}: extends: expected a path to a YAML file, got {type(parent).__name__}")
    base = _load_raw(path.parent / parent, (*seen, path))
    return _deep_merge(base, raw)


def _parse_override(item: str) -> tuple[list[str], Any]:
    """key.path=value, the value read as YAML (numbers, booleans, lists), except that a text field takes the
    value as written: `finetune.prompt=translate English to German: {source}` is not a mapping."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise UserError(f"override '{item}': expected key.path=value, e.g. train.lr=3e-4")
    parts = key.split(".")
    quoted = len(value) > 1 and value[0] == value[-1] and value[0] in "'\""
    if _is_text_field(parts) and value not in ("null", "~") and not quoted:
        return parts, value
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        text = value.strip()
        if text[:1] in ("[", "{"):  # a list or mapping, not text: its raw form would be taken for a path
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            inner = text[1:-1] if text[-1:] == "]" else text[1:]
            why = " (a glob's * starts a YAML alias)" if "*" in text else ""
            hint = (f"; quote each item{why}, e.g. "
                    f"{key}=[{', '.join(repr(x.strip()) for x in inner.split(','))}]") if text[0] == "[" else ""
            raise UserError(f"override '{item}': not valid YAML ({problem}){hint}") from None
        parsed = value
    return parts, parsed


def _is_text_field(parts: list[str]) -> bool:
    """Whether the schema types this dotted field as text (str or str | None), not a literal or number."""
    model = _section_model(tuple(parts))
    field = model.model_fields.get(parts[-1]) if model else None
    if field is None and len(parts) > 1:  # an entry of a text mapping: data.columns.text=sentence
        parent_model = _section_model(tuple(parts[:-1]))
        parent = parent_model.model_fields.get(parts[-2]) if parent_model else None
        return parent is not None and parent.annotation == dict[str, str]
    return field is not None and field.annotation in (str, str | None, Optional[str])


def _apply_override(raw: dict[str, Any], parts: list[str], value: Any, cwd: Path) -> None:
    node = raw
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise UserError(f"override '{'.'.join(parts)}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value
    if tuple(parts) in _PATH_FIELDS | _PATH_LIST_FIELDS:  # command-line paths: relative to the cwd
        _resolve_paths({parts[0]: node}, cwd)


# Hugging Face TrainingArguments / config names users carry over, and gptkit's name for the same setting
_HF_NAMES = {"learning_rate": "lr", "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
             "gradient_accumulation_steps": "grad_accum", "max_grad_norm": "grad_clip", "adam_beta1": "beta1",
             "adam_beta2": "beta2", "logging_steps": "log_every", "eval_steps": "eval_every", "save_steps": "save_every",
             "save_total_limit": "keep_last", "label_smoothing_factor": "label_smoothing", "lr_scheduler_type":
             "schedule", "torch_compile": "compile", "bf16": "precision", "fp16": "precision", "num_layers": "n_layer",
             "n_positions": "context", "max_position_embeddings": "context", "hidden_size": "n_embd",
             "num_attention_heads": "n_head", "num_hidden_layers": "n_layer",
             "early_stopping_patience": "patience", "metric_for_best_model": "metric", "max_seq_length": "max_length",
             "version_2_with_negative": "no_answer"}


def _closest(name: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    if _HF_NAMES.get(name) in model.model_fields:
        return f" (did you mean '{_HF_NAMES[name]}'?)"
    match = difflib.get_close_matches(name, list(model.model_fields), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def is_int_field(dotted: str) -> bool:
    """Whether the schema types this dotted field as an integer (int or int | None): a sweep must not draw floats."""
    parts = tuple(dotted.split("."))
    model = _section_model(parts)
    field = model.model_fields.get(parts[-1]) if model else None
    return field is not None and field.annotation in (int, int | None, Optional[int])


def format_validation_error(source: str, err: ValidationError) -> str:
    """One line for the first schema error: file, dotted field path, what was expected."""
    e = err.errors()[0]
    loc = tuple(e["loc"])
    field = ".".join(str(p) for p in loc) or "(top level)"
    if e["type"] == "extra_forbidden":
        return f"{source}: {field}: unknown key{_closest(str(loc[-1]), _section_model(loc))}"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    shown = "" if isinstance(got, dict) or got is None or ", got " in msg else f", got {got!r}"
    return f"{source}: {field}: {msg}{shown}"


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe file (following ``extends``), apply dotted overrides, validate it."""
    path = Path(path)
    raw = _load_raw(path)
    keys = []
    for item in overrides:
        parts, value = _parse_override(item)
        _apply_override(raw, parts, value, Path.cwd())
        keys.append(tuple(parts))
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        loc = tuple(str(p) for p in err.errors()[0]["loc"])
        # an override names the field, or a part of it (train.lr.x=5 fails at train.lr; a list item below its field)
        # (foo.bar=1 fails at foo; train.lr=1e-5 at train, where min_lr is checked against it)
        source = "command-line override" if any(loc[: len(k)] == k or loc and k[: len(loc)] == loc
                                                for k in keys) else str(path)
        raise UserError(format_validation_error(source, err)) from None


def column_fields_check(columns: dict[str, str], fields: tuple[str, ...], where: str) -> None:
    """Every key of a columns mapping names one of the task's fields: a typo (sorce: de) was dropped in silence,
    and the run read the default column or failed on a column it was told to rename."""
    for key in columns:
        if key not in fields:
            match = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
            raise UserError(f"{where}.{key}: not a field of the task; its fields are {', '.join(fields)}"
                            + (f" (did you mean '{match[0]}'?)" if match else ""))


def check_deepspeed_config(recipe: Recipe, source: str) -> None:
    """strategy deepspeed's ZeRO JSON exists (checked where a command runs, not when a saved run's recipe is read:
    only the launch needs it)."""
    path = recipe.distributed.deepspeed_config
    if recipe.distributed.strategy == "deepspeed" and path and not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "not found"
        raise UserError(f"{source}: distributed.deepspeed_config: {path} {what}; expected a ZeRO JSON file such as "
                        "recipes/accelerate/deepspeed/zero2.json")


def check_columns(recipe: Recipe, task: str, source: str) -> None:
    """data.columns (and each multitask entry's columns) against the fields of the task the command runs, known only
    once --task is read; pretraining reads data.text_column and a multitask run each entry's columns, so
    data.columns there would be ignored."""
    from gptkit import tasks

    if recipe.data.columns and task in ("pretrain", "multitask"):
        instead = "data.text_column" if task == "pretrain" else "finetune.tasks[i].columns"
        raise UserError(f"{source}: data.columns: task {task} does not read it (it reads {instead})")
    if task == "multitask":
        for i, sub in enumerate(recipe.finetune.tasks):
            module = tasks.load(sub.task)
            column_fields_check(sub.columns, (*module.FIELDS, *module.OPTIONAL), f"{source}: finetune.tasks[{i}].columns")
    elif task != "pretrain":
        module = tasks.load(task)
        column_fields_check(recipe.data.columns, (*module.FIELDS, *module.OPTIONAL), f"{source}: data.columns")


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (what gets written into the run directory)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def schema_reference() -> str:
    """Every recipe field with its default and meaning, rendered from the schema itself (Markdown)."""

    def default(f: Any) -> str:
        value = f.default_factory() if f.default_factory is not None else f.default  # train.trackers: [tensorboard]
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        return "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix(
            "...").strip()

    lines: list[str] = []
    for name, f in Recipe.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines += ["", f"{name}: {(ann.__doc__ or '').strip()}", "", "| field | default | meaning |", "|---|---|---|"]
            lines += [f"| `{name}.{n}` | `{default(sf)}` | {sf.description} |" for n, sf in ann.model_fields.items()]
        else:
            lines.append(f"| `{name}` | `{default(f) or chr(34) * 2}` | {f.description} |")
    return "\n".join(["| field | default | meaning |", "|---|---|---|", *lines])
