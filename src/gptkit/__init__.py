"""gptkit: pretrain, fine-tune, evaluate and sample GPT-style models, offline, from one YAML recipe."""

__version__ = "0.1.0"
