"""Hugging Face causal LMs: load from a local folder, build tiny random ones, inject outlier
channels without changing the function, save a pruned model with its sparsity report."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from inferno.errors import ConfigError

FAMILIES = ("llama", "mistral", "qwen2", "opt", "gpt2")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(_DTYPES) + ['auto']}, got {dtype!r}")
    return _DTYPES[dtype]


def load_causal_lm(path, dtype="float32", device="cpu") -> nn.Module:
    """A causal LM from a local folder (never downloads), in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.path {str(path)!r} is not a local folder with a Hugging Face model")
    cfg = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").is_file() else {}
    if cfg.get("pruned_layers") or cfg.get("pruned_biases"):  # per-layer sizes stock transformers cannot express
        return load_pruned(path, dtype=dtype, device=device)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_dtype(dtype), trust_remote_code=False, local_files_only=True
    )
    return model.to(device).eval()


def tiny_config(
    family: str,
    vocab_size: int = 256,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    max_positions: int = 128,
):
    """A small transformers config of the given family (hidden 64, 2 blocks, vocab 256 by default)."""
    import transformers as tf

    common = {"vocab_size": vocab_size, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        return cls(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **common,
        )
    if family == "opt":
        return tf.OPTConfig(
            hidden_size=hidden,
            ffn_dim=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=max_positions,
            word_embed_proj_dim=hidden,
            dropout=0.0,
            attention_dropout=0.0,
            **common,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_inner=intermediate,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    raise ConfigError(f"model family must be one of {list(FAMILIES)}, got {family!r}")


def tiny_causal_lm(family: str = "llama", seed: int = 0, **config_overrides) -> nn.Module:
    """A randomly initialised small causal LM (deterministic given ``seed``), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **config_overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def outlier_pairs(block: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """A Llama-family block's (RMSNorm, linears reading its output) pairs."""
    return [
        (block.input_layernorm, [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj]),
        (block.post_attention_layernorm, [block.mlp.gate_proj, block.mlp.up_proj]),
    ]


@torch.no_grad()
def important_channels(norm: nn.Module, linears: list[nn.Linear], count: int) -> torch.Tensor:
    """The ``count`` channels whose removal costs most, from the weights alone: |g_j| * ||[W_1; ...; W_m][:, j]||_2
    (norm gain times the norm of the input column over every linear reading the norm)."""
    col = torch.stack([lin.weight.float().pow(2).sum(0) for lin in linears]).sum(0).sqrt()
    score = norm.weight.float().abs() * col
    return torch.topk(score, count).indices.sort().values


@torch.no_grad()
def inject_outliers(model: nn.Module, channels="important", factor: float = 50.0, count: int = 4) -> nn.Module:
    """Make a few hidden channels huge without changing the function (Llama family: llama, mistral, qwen2).

    In every block, RMSNorm weight channel c is multiplied by ``factor`` and the input column c of the
    linears that read that norm's output (q/k/v after ``input_layernorm``; gate/up after
    ``post_attention_layernorm``) is divided by it: the products are unchanged, but |W| in those
    columns shrinks while the activations grow -- the situation where magnitude pruning fails and
    activation-aware scores (Wanda) do not.

    ``channels``: a list (the same channels in every norm); ``"important"``: each norm's ``count`` most
    important channels (``important_channels``) -- in real LLMs the outlier features are the channels the model
    relies on most, which is what makes magnitude pruning fail there; ``"spread"``: ``count`` evenly spaced ones.
    """
    if channels == "important":
        pick = lambda norm, linears: important_channels(norm, linears, count)
    elif isinstance(channels, str) and channels != "spread":
        raise ConfigError(f"model.outlier_channels: '{channels}' is not important, spread or a list of channels")
    else:
        hidden = model.config.hidden_size
        fixed = (torch.arange(count) * hidden // count + hidden // (2 * count) if channels == "spread"
                 else torch.as_tensor(list(channels), dtype=torch.long))
        pick = lambda norm, linears: fixed
    for block in model.model.layers:
        for norm, linears in outlier_pairs(block):
            idx = pick(norm, linears)
            norm.weight[idx] *= factor
            for lin in linears:
                lin.weight[:, idx] /= factor
    return model


def _stock_biases(model: nn.Module) -> set[str]:
    """Names (inside a block) of the linears that carry a bias in the stock architecture of ``model.config``."""
    from inferno.pruning.llm.runner import find_linears, get_blocks

    block = get_blocks(model)[0]
    with torch.device("meta"):
        stock = type(block)(model.config, 0)
    return {n for n, m in find_linears(stock).items() if m.bias is not None}


def added_biases(model: nn.Module) -> list[str]:
    """Full names of block linears that have a bias the stock architecture lacks (FLAP's compensation)."""
    from inferno.pruning.llm.runner import blocks_path, find_linears, get_blocks

    stock, path = _stock_biases(model), blocks_path(model)
    return [f"{path}.{i}.{n}" for i, b in enumerate(get_blocks(model)) for n, m in find_linears(b).items()
            if m.bias is not None and n not in stock]


def _uniform_config(model: nn.Module) -> dict | None:
    """Config keys that let stock transformers build the pruned shapes (every layer the same sizes, Llama family,
    head_dim kept explicit), or None when transformers cannot express them."""
    from inferno.pruning.llm.runner import get_blocks
    from inferno.pruning.llm.surgery import block_units

    cfg = model.config
    record = getattr(cfg, "pruned_layers", None) or {}
    if not record:
        return {}
    if cfg.model_type not in ("llama", "mistral", "qwen2"):
        return None  # OPT / GPT-2 derive head_dim from hidden / heads: a head count change is not expressible
    sizes = {tuple(sorted(block_units(b, cfg).items())) for b in get_blocks(model)}
    if len(sizes) != 1:
        return None
    u = dict(next(iter(sizes)))
    return {"num_attention_heads": u["kv_heads"] * u["group"], "num_key_value_heads": u["kv_heads"],
            "intermediate_size": u["neurons"], "head_dim": u["head_dim"]}


def save_pruned(model: nn.Module, tokenizer, outdir, report: dict, structure: dict | None = None,
                extra: dict | None = None) -> Path:
    """``save_pretrained`` (safetensors + config) + tokenizer if given + ``pruning_report.json``.

    ``report``: {linear: sparsity} (unstructured methods); ``structure``: {layer: {"heads_kept", "neurons_kept",
    ...}} (what the surgery returned per layer); ``extra``: anything else for the report (method, sparsity, ...).
    Where stock transformers can express the shapes (no per-layer sizes: unpruned or removed blocks only, or every
    layer the same sizes on a Llama-family model, and no added biases), config.json describes them and a plain
    ``AutoModelForCausalLM.from_pretrained`` reloads the model; otherwise config.json keeps ``pruned_layers`` and
    ``pruned_biases`` and :func:`load_pruned` rebuilds it (``report["loader"]`` says which)."""
    from inferno.models.stream import is_streamed

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    if is_streamed(model):  # blocks on disk: written block by block (nothing to do where they already are)
        model.block_source.save(out)
    else:
        model.save_pretrained(out)  # transformers >= 5 always writes safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    biases = added_biases(model)
    uniform = None if biases else _uniform_config(model)
    if uniform is not None:
        cfg.update(uniform)
        cfg.pop("pruned_layers", None)
    if biases:
        cfg["pruned_biases"] = biases
    cfg_path.write_text(json.dumps(cfg, indent=2))
    values = list(report.values())
    summary = {
        "mean_layer_sparsity": sum(values) / len(values) if values else 0.0,
        "layers": report,
        "loader": "AutoModelForCausalLM.from_pretrained" if uniform is not None else "inferno.models.hf.load_pruned",
        "params": sum(p.numel() for p in model.parameters()),
    }
    if structure is not None:
        summary["structure"] = {str(i): {"kv_heads_kept": v.get("heads_kept"), "neurons_kept": v.get("neurons_kept"),
                                         "kv_heads": v.get("kv_heads"), "q_heads": v.get("q_heads"),
                                         "neurons": v.get("neurons")} for i, v in sorted(structure.items())}
        summary["removed_blocks"] = list(getattr(model.config, "removed_layers", None) or [])
        summary["added_biases"] = biases
    summary |= extra or {}
    (out / "pruning_report.json").write_text(json.dumps(summary, indent=2, default=str))
    return out


def _state_dict_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = path / "model.safetensors"
    if not single.is_file():
        raise ConfigError(f"model.path: no model.safetensors in {path}")
    return [single]


def load_pruned(path, dtype="float32", device="cpu") -> nn.Module:
    """A model saved by :func:`save_pruned` (or any local causal LM) in one call: the stock architecture built
    from config.json (never ``trust_remote_code``), every layer listed in ``pruned_layers`` shrunk to its sizes by
    the surgery, the ``pruned_biases`` added, then the safetensors loaded strictly (tied embeddings re-tied)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from inferno.pruning.llm.runner import get_blocks
    from inferno.pruning.llm.surgery import add_bias, resize_block

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: no Hugging Face model (config.json) in {path}")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    record = dict(getattr(config, "pruned_layers", None) or {})
    biases = list(getattr(config, "pruned_biases", None) or [])
    config.pruned_layers = {}
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    blocks = get_blocks(model)
    for layer, sizes in record.items():  # only the shapes matter: the weights come from the file
        resize_block(blocks[int(layer)], config, sizes["num_key_value_heads"], sizes["intermediate_size"], int(layer))
    for name in biases:
        add_bias(model.get_submodule(name))
    state = {}
    for f in _state_dict_files(path):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ConfigError(f"model.path: {path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    dt = _dtype(dtype)
    return model.to(device=device, dtype=None if dt == "auto" else dt).eval()


# ----------------------------------------------------------------------------------- builders of conf/model
def torch_device(accelerator: str | None) -> str:
    """Hardware config's accelerator -> torch device string (``cost.run_device``)."""
    from inferno.cost import run_device

    return str(run_device(accelerator))


def _outliers(model: nn.Module, channels, factor: float, count: int) -> None:
    if getattr(model.config, "model_type", None) not in ("llama", "mistral", "qwen2"):
        raise ConfigError(f"model.outliers: needs a Llama-family model (llama, mistral, qwen2), not {model.config.model_type}")
    inject_outliers(model, channels, float(factor), int(count))


def load_model(
    path: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    outliers: bool = False,
    outlier_channels="important",
    outlier_factor: float = 50.0,
    outlier_count: int = 4,
    hint: str | None = None,
    stream: bool = False,
) -> nn.Module:
    """A local Hugging Face causal LM (``trust_remote_code`` off, never downloads), optionally with
    function-preserving outlier channels (``inject_outliers``). ``stream``: the decoder blocks stay in the folder's
    safetensors and are read one at a time (``inferno.models.stream``; no outliers then: they would change weights
    that are not in memory)."""
    if not path:
        raise ConfigError("model.path: set model.path=DIR, a local Hugging Face causal-LM folder")
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model.path: no Hugging Face model in {path}" + (f" ({hint})" if hint else ""))
    if not isinstance(stream, bool):
        raise ConfigError(f"model.stream: {stream!r} must be true or false")
    if stream:
        from inferno.models.stream import stream_causal_lm

        if outliers:
            raise ConfigError("model.stream: model.outliers=true rewrites every block in memory; allowed with "
                              "model.stream=false only")
        return stream_causal_lm(path, dtype=_dtype(dtype), device=torch_device(device))
    model = load_causal_lm(path, dtype=dtype, device=torch_device(device))
    if outliers:
        _outliers(model, outlier_channels, outlier_factor, outlier_count)
    return model


def tiny_model(family: str = "llama", seed: int = 0, dtype: str = "float32", device: str = "cpu", outliers: bool = False,
               outlier_channels="important", outlier_factor: float = 50.0, outlier_count: int = 4, stream: bool = False,
               **config) -> nn.Module:
    """A small random model of a family (``models.hf.tiny_causal_lm``), for tests and smoke runs."""
    if stream is not False:
        raise ConfigError(f"model.stream: tiny_{family} is built in memory, there is no folder to stream from; "
                          "model.stream=true needs model=hf_causal_lm (or bench_lm) with model.path=DIR holding "
                          "safetensors")
    model = tiny_causal_lm(family, seed=seed, **config)
    if outliers:
        _outliers(model, outlier_channels, outlier_factor, outlier_count)
    return model.to(device=torch_device(device), dtype=_dtype(dtype)).eval()
