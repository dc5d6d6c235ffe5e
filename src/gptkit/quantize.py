"""``gptkit quantize RUN --method int8|int4 --out DIR``: post-training weight quantization with torchao (``gptkit[quantize]``).

torchao quantizes ``nn.Linear`` layers only, and GPT-2 in transformers computes its projections with ``Conv1D``
(weights stored transposed), which it would silently leave in float. A GPT-2 model is therefore first rewritten,
exactly, as GPTBigCode (``multi_query=False``): the same decoder block — learned positions, LayerNorm, GELU MLP,
scaled dot-product attention — with ``nn.Linear`` projections; Conv1D weights are transposed and the fused q/k/v
rows reordered per head (GPT-2 lays them out as [q | k | v], GPTBigCode as [q_h k_h v_h] per head). The rewrite
is checked on the spot (logits of both models on a probe batch agree to 1e-4) before anything is quantized.
Other architectures (Llama, BART, T5, ...) already use ``nn.Linear``.

Methods: ``int8`` — per-channel int8 weights (torchao ``Int8WeightOnlyConfig``); ``int4`` — int4 weights in groups
of 32 (``IntxWeightOnlyConfig``; torchao 0.18 has no packed int4 layout that runs on CPU *and* saves, so on disk
they take int8 space: int4 accuracy, int8 size). Embeddings and the (tied) output layer stay in float.
The output folder loads with plain ``AutoModelForCausalLM.from_pretrained`` (torchao installed) and is accepted by
``gptkit eval``, ``generate`` and ``serve``; a fine-tuned run's recipe goes with it (its prompt and decoding), and
``quantize.json`` records the method, the source and the sizes.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from gptkit import rundir
from gptkit.errors import UserError

log = logging.getLogger(__name__)

METHODS = ("int8", "int4")
INT4_GROUP = 32  # int4 weights share a scale per this many inputs


def import_torchao():
    """torchao, quiet (its import reports CUDA extensions it cannot load), or a one-line error naming the extra."""
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import torchao
    except ImportError:
        raise UserError("quantized models need torchao: pip install 'gptkit[quantize]'") from None
    return torchao


def torchao_config(method: str):
    import torch

    import_torchao()
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup

    if method == "int8":
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))


def gpt2_to_bigcode(gpt2: Any) -> Any:
    """An exactly equivalent ``GPTBigCodeForCausalLM`` (``nn.Linear`` projections) of a ``GPT2LMHeadModel``."""
    import torch
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    c = gpt2.config
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(c, flag, False):
            raise UserError(f"RUN: a GPT-2 with {flag}=true has no nn.Linear equivalent to quantize")
    config = GPTBigCodeConfig(
        vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=c.n_inner, activation_function=c.activation_function, resid_pdrop=c.resid_pdrop,
        embd_pdrop=c.embd_pdrop, attn_pdrop=c.attn_pdrop, layer_norm_epsilon=c.layer_norm_epsilon,
        initializer_range=c.initializer_range, scale_attn_weights=c.scale_attn_weights, use_cache=True,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, multi_query=False,
        tie_word_embeddings=c.tie_word_embeddings)
    heads, width = c.n_head, c.n_embd
    state = {}
    for key, value in gpt2.state_dict().items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of older checkpoints
            continue
        value = value.detach().clone()
        if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            value = value.t().contiguous()  # Conv1D stores (in, out); nn.Linear (out, in)
        if key.endswith(("c_attn.weight", "c_attn.bias")):  # [q | k | v] -> per head [q_h | k_h | v_h]
            rest = value.shape[1:]
            value = value.reshape(3, heads, width // heads, *rest).transpose(0, 1).reshape(3 * width, *rest)
        state[key] = value.contiguous()
    model = GPTBigCodeForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and c.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GPT-2 -> GPTBigCode: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.generation_config = gpt2.generation_config
    probe = torch.randint(0, c.vocab_size, (2, min(16, c.n_positions)))
    # compared in fp32 (the copy is built in fp32): a bf16/fp16 original's own rounding would exceed 1e-4
    reference = gpt2 if gpt2.dtype == torch.float32 else copy.deepcopy(gpt2).float()
    with torch.no_grad():
        gap = (model(probe).logits - reference.eval()(probe).logits).abs().max().item()
    if gap > 1e-4:
        raise RuntimeError(f"GPT-2 -> GPTBigCode: logits differ by {gap:.2e}")
    return model.to(gpt2.dtype)


def count_quantized(model: Any) -> int:
    """Modules whose weight is a torchao quantized tensor."""
    from torchao.utils import TorchAOBaseTensor

    return sum(isinstance(getattr(m, "weight", None), TorchAOBaseTensor) for m in model.modules())


def check_loads(folder: Path, config: Any, method: str) -> None:
    """Transformers reads the saved folder back: torchao cannot deserialize every architecture's quantized weights
    (BART's fail), and a folder that does not load must not be reported as written."""
    from transformers.utils import logging as hf_logging

    from gptkit import modeling

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would print beside the one-line error
    try:
        modeling.lm_class(config).from_pretrained(str(folder))
    except Exception as e:  # whatever the loader raises, the folder is unusable
        raise UserError(f"RUN: a {method}-quantized {config.model_type} does not load back in transformers "
                        f"({type(e).__name__}); nothing was written to --out") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def run(source: str, method: str, out: Path) -> dict:
    """Quantize the language model of ``source`` (a run, its best/, or a model folder) into ``out``."""
    import torch
    from transformers import GPT2LMHeadModel, TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    from gptkit import hub, trained

    if method not in METHODS:
        raise UserError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    rundir.check_out_folder(out)
    import_torchao()
    path = hub.resolve(source, "RUN", weights=True).path
    model, tok, run_recipe = trained.load_any(source, "RUN")
    if run_recipe is not None and trained.has_head(run_recipe.task, run_recipe):
        raise UserError(f"RUN: {path} is a {run_recipe.task} model with a task head; gptkit quantize takes language "
                        "models (pretraining runs, generative fine-tunes, model folders)")
    if getattr(model.config, "quantization_config", None) is not None:
        raise UserError(f"RUN: {path} is already quantized ({model.config.quantization_config})")
    model = model.cpu()
    if hasattr(model, "merge_and_unload"):  # LoRA adapters: fold them in first
        model = model.merge_and_unload()
    # a LoRA run's folder holds its adapters only: the merged model is what gets quantized
    before = (not trained.is_adapter_dir(path) and weight_bytes(path)) or \
        sum(p.numel() * p.element_size() for p in model.parameters())
    converted = isinstance(model, GPT2LMHeadModel)
    if converted:
        model = gpt2_to_bigcode(model)
    from torchao.quantization import quantize_

    quant = torchao_config(method)
    output_names = {n for n, m in model.named_modules() if m is model.get_output_embeddings()}
    if method == "int4":  # torchao asserts (a traceback) on a row that does not split into whole groups
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name not in output_names and m.in_features % INT4_GROUP:
                raise UserError(f"--method int4: {name} takes {m.in_features} inputs, not a multiple of the group "
                                f"size {INT4_GROUP}; use --method int8 for this model")
    quantize_(model, quant, filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and name not in output_names)
    layers = count_quantized(model)
    config = TorchAoConfig(quant)
    model.config.quantization_config = config
    model.hf_quantizer = TorchAoHfQuantizer(config, pre_quantized=True)
    with rundir.new_folder(out) as staging:  # becomes out once it loads back
        model.save_pretrained(str(staging))
        tok.save_pretrained(str(staging))
        trained.write_recipe(run_recipe, staging)
        check_loads(staging, model.config, method)
        record = {"method": method, "source": str(Path(path).resolve()), "architecture": type(model).__name__,
                  "converted_from_gpt2": converted, "quantized_layers": layers, "bytes_before": before,
                  "bytes_after": weight_bytes(staging), "torchao": _version("torchao")}
        (staging / "quantize.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("quantize: %s -> %s (%s): %d linear layers quantized%s; weights %.2f MB -> %.2f MB (%.2fx)", path, out,
             method, layers, " after rewriting GPT-2 as GPTBigCode" if converted else "", before / 1e6,
             record["bytes_after"] / 1e6, record["bytes_after"] / max(1, before))
    return record


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
