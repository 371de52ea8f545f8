"""The one structural surgery for LLM decoder blocks: remove (or mask) attention heads and MLP neurons.

A block-level method looks at a decoder block and returns a ``BlockDecision``; this module applies it.

Interface
---------
``BlockDecision(heads=[...], neurons=[...])``
    ``heads``: indices of KV heads to remove. Each takes its whole KV group with it: the KV head and the
    ``g = n_heads / n_kv_heads`` query heads that share it (HF's ``repeat_kv`` maps query head ``h`` to KV
    head ``h // g``, so KV head ``j`` owns query heads ``j*g .. j*g+g-1``). In multi-head models (OPT,
    GPT-2, Llama with n_kv == n_heads) a KV head is simply a head. ``neurons``: indices of MLP
    intermediate neurons to remove. Indices always refer to the block's *current* units (0 .. n-1 of
    what ``block_units`` reports), so a block already pruned once is indexed in its new numbering.
``block_units(block, config) -> {"kv_heads", "group", "head_dim", "neurons"}``
    the block's current sizes, read from its weight shapes.
``coupled(block, config) -> Coupled``
    the family adapter: for one head / one neuron, which ``Slice``s of which linears belong to it
    (``"out"`` = output rows of the (out, in) weight, with their bias entries; ``"in"`` = input columns).
    Llama/Mistral/Qwen2: q rows (g*d per KV head), k and v rows (d) (+ biases when present, Qwen2),
    o_proj columns (g*d); gate and up rows, down columns. OPT: q, k, v rows + biases, out_proj columns;
    fc1 rows + bias, fc2 columns. GPT-2: the fused q|k|v output features of ``c_attn`` (three slices of
    one Conv1D, at offsets 0, n*d, 2n*d) + bias, ``c_proj`` input features; ``c_fc`` outputs + bias,
    the MLP's ``c_proj`` inputs.
    BERT encoders (``models.encoder.EncoderClassifier``, blocks at ``bert.encoder.layer``): query/key/value
    rows + biases, ``attention.output.dense`` columns; ``intermediate.dense`` rows + bias, ``output.dense`` columns.
    A linear carrying its own ``shrink_`` / ``zero_`` (a SPLoRA adapter) removes / zeroes its adapter with it.
``mask_block(block, config, decision, layer=None) -> None``
    zero the coupled weights (and the bias entries of removed rows) in place; shapes unchanged. This
    is exactly the function of the removed block: a removed head gives q = k = v = 0 (uniform attention
    over zero values) and its o-columns are zero; a removed neuron gives act(0) * 0 (or act(0) = 0 for
    ReLU/GELU) and its down-column is zero.
``remove_from_block(block, config, decision, layer=None) -> {"heads_kept": [...], "neurons_kept": [...], ...}``
    physically shrink the linears (same dtype, device and ``requires_grad``; bias entries kept for the
    surviving rows) and update the per-block attributes the forward reads. The kept indices are in the
    numbering the decision used. The new per-layer sizes are recorded on the model config (below).
``apply(model, decisions: {layer: BlockDecision}, mode="remove" | "mask") -> {layer: {"kv_heads", "q_heads", "neurons"}}``
    both over every listed block; the report gives the sizes *in effect* after the call (for
    ``"mask"``: the units that are not zeroed by this call). Blocks not listed are untouched.
``resize_block(block, config, kv_heads, neurons, layer=None) -> dict``
    shrink a block to the given sizes, keeping its first units (``remove_from_block`` of the rest): the shapes of a
    saved pruned block, rebuilt before its weights are loaded (``models.hf.load_pruned``).
``add_bias(module) -> nn.Parameter``
    the module's bias, a zero one first where an ``nn.Linear`` has none (FLAP's bias compensation on Llama's
    o_proj / down_proj); Conv1D always has one.
``remove_blocks(model, layers) -> kept``
    delete whole decoder blocks (ShortGPT) and renumber what indexes by layer (``layer_idx``, ``num_hidden_layers``,
    ``layer_types``, ``pruned_layers``); ``config.removed_layers`` lists them in the original numbering.

``layer`` (optional, block-level functions) names the layer in error messages and in the config
record; when omitted it is read from ``self_attn.layer_idx`` / ``attn.layer_idx``.

Design choices
--------------
* The linears are shrunk *in place* (their ``weight``/``bias`` parameters are replaced and
  ``in_features``/``out_features`` or Conv1D's ``nf``/``nx`` updated) rather than swapped for new
  module objects: the result is the same smaller ``nn.Linear``/``Conv1D``, and anything holding the
  module (the runner's ``find_linears`` dict, hooks) stays valid. Optimizers must be rebuilt.
* Per-family attributes updated: Llama/Mistral/Qwen2 -- none needed by the forward (heads come from
  ``view(..., -1, head_dim)`` and ``num_key_value_groups`` stays valid because whole groups go);
  ``mlp.intermediate_size`` is kept in step for readability. OPT -- ``self_attn.num_heads`` (its forward
  does ``view(bsz, -1, self.num_heads, self.head_dim)``). GPT-2 -- ``attn.split_size`` (the fused
  q|k|v split) and ``attn.num_heads``. ``head_dim`` and the attention scaling never change.
* Removing every head of a block is refused (``ValueError``: "cannot remove all N KV heads of layer
  i; keep at least one"): a zero-head attention cannot be reshaped by the HF forward. The same check
  applies in ``"mask"`` mode so both modes accept exactly the same decisions. Removing every MLP
  neuron is allowed for Llama/Mistral/Qwen2/OPT: the linears become zero-size (``save_pretrained``
  stores them) and the MLP returns its output bias (zeros for bias-free Llama), which is what the
  masked model computes too -- i.e. the MLP is skipped. GPT-2 refuses it (``ValueError``): its
  Conv1D forward reshapes with ``view(-1, n_in)``, which fails for zero features.
* Out-of-range, duplicated or non-integer indices raise ``ValueError`` naming the layer, before any
  weight is touched.
* The global config keeps describing the unpruned model; the pruned sizes are recorded in
  ``config.pruned_layers = {"<layer>": {"num_attention_heads", "num_key_value_heads",
  "intermediate_size"}}`` (string keys, so the dict is the same after a JSON round trip of
  ``config.json``). Masking records nothing (the shapes do not change).
* KV caches (Dynamic, Static, sliding-window) size themselves from the key states on first update,
  so ``generate(use_cache=True)`` works with per-layer head counts.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from inferno.pruning.llm.runner import blocks_path, get_blocks, get_weight


@dataclass
class BlockDecision:
    """What to remove from one decoder block. ``heads``: indices of KV heads to remove; each takes its whole
    KV group with it (the KV head and the g = n_heads / n_kv_heads query heads that share it: HF's repeat_kv
    maps query head h to KV head h // g); in multi-head models (OPT, GPT-2, Llama with n_kv == n_heads) a KV head
    is simply a head. ``neurons``: indices of MLP intermediate neurons to remove."""

    heads: list[int] = field(default_factory=list)
    neurons: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Slice:
    """Unit ``u`` owns features ``offset + u*width .. offset + (u+1)*width - 1`` of ``module`` along ``dim``:
    ``"out"`` = rows of the (out, in) weight and the matching bias entries, ``"in"`` = columns."""

    module: nn.Module
    dim: str
    offset: int
    width: int


@dataclass
class Coupled:
    """Everything one head / one neuron owns in a block, plus the modules whose attributes follow."""

    heads: list[Slice]
    neurons: list[Slice]
    attn: nn.Module
    mlp: nn.Module


# ----------------------------------------------------------------------------------- family adapters
class _Family:
    """What the families share: ``attn.head_dim``; KV heads from ``k_proj``'s rows; one query head per KV head;
    zero-size MLP linears run (the MLP then returns its output bias). Each family adds ``parts``, ``neurons``,
    ``slices`` and the attributes its forward reads (``update``)."""

    empty_mlp = True

    @staticmethod
    def head_dim(attn):
        return attn.head_dim

    @staticmethod
    def kv_heads(attn):
        return get_weight(attn.k_proj).shape[0] // attn.head_dim

    @staticmethod
    def group(attn):
        return 1


class _Llama(_Family):
    """Llama, Mistral, Qwen2: q/k/v/o_proj (GQA), gate/up/down_proj."""

    @staticmethod
    def parts(block):
        return block.self_attn, block.mlp

    @staticmethod
    def group(attn):
        return attn.num_key_value_groups

    @staticmethod
    def neurons(mlp):
        return get_weight(mlp.up_proj).shape[0]

    @staticmethod
    def slices(attn, mlp, n_kv, g, d):
        heads = [Slice(attn.q_proj, "out", 0, g * d), Slice(attn.k_proj, "out", 0, d),
                 Slice(attn.v_proj, "out", 0, d), Slice(attn.o_proj, "in", 0, g * d)]
        neurons = [Slice(mlp.gate_proj, "out", 0, 1), Slice(mlp.up_proj, "out", 0, 1), Slice(mlp.down_proj, "in", 0, 1)]
        return heads, neurons

    @staticmethod
    def update(attn, mlp, n_kv, g, n_neurons):
        mlp.intermediate_size = n_neurons  # not read by the forward; kept truthful


class _OPT(_Family):
    """OPT: q/k/v/out_proj (multi-head), fc1/fc2 directly in the decoder layer."""

    @staticmethod
    def parts(block):
        return block.self_attn, block

    @staticmethod
    def neurons(mlp):
        return get_weight(mlp.fc1).shape[0]

    @staticmethod
    def slices(attn, mlp, n_kv, g, d):
        heads = [Slice(attn.q_proj, "out", 0, d), Slice(attn.k_proj, "out", 0, d),
                 Slice(attn.v_proj, "out", 0, d), Slice(attn.out_proj, "in", 0, d)]
        neurons = [Slice(mlp.fc1, "out", 0, 1), Slice(mlp.fc2, "in", 0, 1)]
        return heads, neurons

    @staticmethod
    def update(attn, mlp, n_kv, g, n_neurons):
        attn.num_heads = n_kv  # forward: view(bsz, -1, self.num_heads, self.head_dim)


class _GPT2(_Family):
    """GPT-2: fused c_attn (Conv1D, q|k|v along the output features), c_proj; MLP c_fc/c_proj."""

    empty_mlp = False  # Conv1D.forward does x.view(-1, 0): a zero-size input cannot be reshaped

    @staticmethod
    def parts(block):
        return block.attn, block.mlp

    @staticmethod
    def kv_heads(attn):
        return get_weight(attn.c_attn).shape[0] // 3 // attn.head_dim

    @staticmethod
    def neurons(mlp):
        return get_weight(mlp.c_fc).shape[0]

    @staticmethod
    def slices(attn, mlp, n_kv, g, d):
        width = n_kv * d  # current q (= k = v) width inside the fused output
        heads = [Slice(attn.c_attn, "out", k * width, d) for k in range(3)] + [Slice(attn.c_proj, "in", 0, d)]
        neurons = [Slice(mlp.c_fc, "out", 0, 1), Slice(mlp.c_proj, "in", 0, 1)]
        return heads, neurons

    @staticmethod
    def update(attn, mlp, n_kv, g, n_neurons):
        attn.num_heads = n_kv
        attn.split_size = n_kv * attn.head_dim  # forward: c_attn(x).split(self.split_size, dim=2)


class _Bert(_Family):
    """BERT encoders (MiniLM): attention.self.query/key/value (multi-head) + attention.output.dense; the MLP is
    intermediate.dense / output.dense directly in the layer. The forward views with ``-1`` heads, so only
    ``num_attention_heads`` / ``all_head_size`` are kept truthful."""

    @staticmethod
    def parts(block):
        return block.attention, block

    @staticmethod
    def head_dim(attn):
        return attn.self.attention_head_size

    @staticmethod
    def kv_heads(attn):
        return get_weight(attn.self.key).shape[0] // attn.self.attention_head_size

    @staticmethod
    def neurons(mlp):
        return get_weight(mlp.intermediate.dense).shape[0]

    @staticmethod
    def slices(attn, mlp, n_kv, g, d):
        s = attn.self
        heads = [Slice(s.query, "out", 0, d), Slice(s.key, "out", 0, d), Slice(s.value, "out", 0, d),
                 Slice(attn.output.dense, "in", 0, d)]
        neurons = [Slice(mlp.intermediate.dense, "out", 0, 1), Slice(mlp.output.dense, "in", 0, 1)]
        return heads, neurons

    @staticmethod
    def update(attn, mlp, n_kv, g, n_neurons):
        attn.self.num_attention_heads = n_kv
        attn.self.all_head_size = n_kv * attn.self.attention_head_size


FAMILIES = {"llama": _Llama, "mistral": _Llama, "qwen2": _Llama, "opt": _OPT, "gpt2": _GPT2, "bert": _Bert}


def _family(config):
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"structured surgery supports model_type {sorted(FAMILIES)}, not {model_type!r}")
    return FAMILIES[model_type]


# ----------------------------------------------------------------------------------- public API
def block_units(block: nn.Module, config) -> dict:
    """Current sizes of a block: {"kv_heads", "group", "head_dim", "neurons"}."""
    fam = _family(config)
    attn, mlp = fam.parts(block)
    return {"kv_heads": fam.kv_heads(attn), "group": fam.group(attn), "head_dim": fam.head_dim(attn),
            "neurons": fam.neurons(mlp)}


def coupled(block: nn.Module, config) -> Coupled:
    """Which slices of which linears belong to one KV head (with its query group) / one MLP neuron."""
    fam = _family(config)
    attn, mlp = fam.parts(block)
    u = block_units(block, config)
    heads, neurons = fam.slices(attn, mlp, u["kv_heads"], u["group"], u["head_dim"])
    return Coupled(heads, neurons, attn, mlp)


def _layer_name(block, config, layer) -> str:
    if layer is None:
        attn, _ = _family(config).parts(block)
        layer = getattr(attn, "layer_idx", None)
    return f"layer {layer}" if layer is not None else "this layer"


def _check(indices, n: int, what: str, where: str) -> list[int]:
    """Validated, sorted unit indices."""
    out = []
    for i in indices:
        try:
            out.append(operator.index(i))
        except TypeError:
            raise ValueError(f"{where}: {what} index {i!r} is not an integer") from None
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"{where}: {what} indices {bad} out of range for {n} {what}s (valid 0..{n - 1})")
    dup = sorted({i for i in out if out.count(i) > 1})
    if dup:
        raise ValueError(f"{where}: duplicate {what} indices {dup}")
    return sorted(out)


def _validate(block, config, decision: BlockDecision, layer) -> tuple[dict, list[int], list[int]]:
    where = _layer_name(block, config, layer)
    u = block_units(block, config)
    heads = _check(decision.heads, u["kv_heads"], "KV head", where)
    neurons = _check(decision.neurons, u["neurons"], "neuron", where)
    if len(heads) == u["kv_heads"]:
        raise ValueError(f"cannot remove all {u['kv_heads']} KV heads of {where}; keep at least one")
    if len(neurons) == u["neurons"] and not _family(config).empty_mlp:
        raise ValueError(f"cannot remove all {u['neurons']} MLP neurons of {where} ({config.model_type}: Conv1D "
                         "cannot run with zero features); keep at least one")
    return u, heads, neurons


def _features(slices: list[Slice], units: list[int]) -> dict[tuple[int, str], tuple[nn.Module, list[int]]]:
    """{(id(module), dim): (module, feature indices owned by ``units``)} -- fused slices of one module merge."""
    out: dict = {}
    for s in slices:
        idx = [s.offset + u * s.width + k for u in units for k in range(s.width)]
        out.setdefault((id(s.module), s.dim), (s.module, []))[1].extend(idx)
    return out


@torch.no_grad()
def mask_block(block: nn.Module, config, decision: BlockDecision, layer: int | None = None) -> None:
    """Zero the weights (and bias entries of removed rows) coupled to the decision; shapes unchanged."""
    _, heads, neurons = _validate(block, config, decision, layer)
    c = coupled(block, config)
    for units, slices in ((heads, c.heads), (neurons, c.neurons)):
        for (_, dim), (module, idx) in _features(slices, units).items():
            if not idx:
                continue
            idx = torch.as_tensor(idx, device=module.weight.device)
            if hasattr(module, "zero_"):  # an adapter-carrying linear (SPLoRA) zeroes its adapter too
                module.zero_(idx, dim)
                continue
            w = get_weight(module)  # (out, in); a view for Conv1D, so writes reach the parameter
            if dim == "out":
                w[idx, :] = 0
                if module.bias is not None:
                    module.bias.data[idx] = 0
            else:
                w[:, idx] = 0


def _shrink(module: nn.Module, keep_out: torch.Tensor | None, keep_in: torch.Tensor | None) -> None:
    """Keep only the given output rows / input columns of an nn.Linear or Conv1D, in place (a module with its own
    ``shrink_``, e.g. a SPLoRA linear, shrinks its adapter with its base weight)."""
    if hasattr(module, "shrink_"):
        module.shrink_(keep_out, keep_in)
        return
    w = get_weight(module)
    if keep_out is not None:
        w = w.index_select(0, keep_out.to(w.device))
    if keep_in is not None:
        w = w.index_select(1, keep_in.to(w.device))
    conv = isinstance(module, Conv1D)
    grad = module.weight.requires_grad
    module.weight = nn.Parameter((w.T if conv else w).contiguous(), requires_grad=grad)
    if keep_out is not None and module.bias is not None:
        b = module.bias.data.index_select(0, keep_out.to(module.bias.device))
        module.bias = nn.Parameter(b.contiguous(), requires_grad=module.bias.requires_grad)
    out_f, in_f = w.shape
    if conv:
        module.nf, module.nx = out_f, in_f
    else:
        module.out_features, module.in_features = out_f, in_f


@torch.no_grad()
def remove_from_block(block: nn.Module, config, decision: BlockDecision, layer: int | None = None) -> dict:
    """Physically remove the decided heads and neurons; returns {"heads_kept", "neurons_kept",
    "kv_heads", "q_heads", "neurons"} (kept indices in the numbering the decision used)."""
    u, heads, neurons = _validate(block, config, decision, layer)
    fam = _family(config)
    c = coupled(block, config)
    heads_kept = sorted(set(range(u["kv_heads"])) - set(heads))
    neurons_kept = sorted(set(range(u["neurons"])) - set(neurons))
    plan: dict = {}  # id(module) -> [module, keep_out, keep_in]
    for removed, kept, slices in ((heads, heads_kept, c.heads), (neurons, neurons_kept, c.neurons)):
        if not removed:
            continue  # leave these linears as they are
        for (_, dim), (module, idx) in _features(slices, kept).items():
            entry = plan.setdefault(id(module), [module, None, None])
            entry[1 if dim == "out" else 2] = torch.as_tensor(sorted(idx), dtype=torch.long)
    for module, keep_out, keep_in in plan.values():
        _shrink(module, keep_out, keep_in)
    n_kv, g = len(heads_kept), u["group"]
    fam.update(c.attn, c.mlp, n_kv, g, len(neurons_kept))
    sizes = {"num_attention_heads": n_kv * g, "num_key_value_heads": n_kv, "intermediate_size": len(neurons_kept)}
    name = layer if layer is not None else getattr(c.attn, "layer_idx", None)
    if name is not None:
        record = dict(getattr(config, "pruned_layers", None) or {})
        record[str(name)] = sizes
        config.pruned_layers = record
    return {"heads_kept": heads_kept, "neurons_kept": neurons_kept,
            "kv_heads": n_kv, "q_heads": n_kv * g, "neurons": len(neurons_kept)}


def apply(model: nn.Module, decisions: dict[int, BlockDecision], mode: str = "remove") -> dict:
    """Apply ``decisions`` ({layer index: BlockDecision}) to every listed block of a HF causal LM, by
    ``"remove"`` (physical) or ``"mask"`` (zeroing); returns {layer: {"kv_heads", "q_heads", "neurons"}}.
    Every decision is validated before any block is changed."""
    if mode not in ("remove", "mask"):
        raise ValueError(f"mode must be 'remove' or 'mask', not {mode!r}")
    blocks, config = get_blocks(model), model.config
    for i, d in decisions.items():
        if not isinstance(i, int) or not 0 <= i < len(blocks):
            raise ValueError(f"layer {i!r} out of range: the model has {len(blocks)} blocks")
        _validate(blocks[i], config, d, i)
    report = {}
    for i in sorted(decisions):
        d = decisions[i]
        if mode == "remove":
            r = remove_from_block(blocks[i], config, d, layer=i)
            report[i] = {k: r[k] for k in ("kv_heads", "q_heads", "neurons")}
        else:
            u = block_units(blocks[i], config)
            mask_block(blocks[i], config, d, layer=i)
            kv = u["kv_heads"] - len(d.heads)
            report[i] = {"kv_heads": kv, "q_heads": kv * u["group"], "neurons": u["neurons"] - len(d.neurons)}
    return report


def resize_block(block: nn.Module, config, kv_heads: int, neurons: int, layer: int | None = None) -> dict:
    """Shrink a block to ``kv_heads`` KV heads and ``neurons`` MLP neurons, keeping its first units (the shapes of a
    saved pruned block, before its weights are loaded); returns what ``remove_from_block`` returns."""
    u = block_units(block, config)
    if not (1 <= kv_heads <= u["kv_heads"] and 0 <= neurons <= u["neurons"]):
        raise ValueError(f"{_layer_name(block, config, layer)}: cannot resize {u['kv_heads']} KV heads / {u['neurons']} "
                         f"neurons to {kv_heads} / {neurons} (only shrinking, at least one KV head)")
    decision = BlockDecision(heads=list(range(kv_heads, u["kv_heads"])), neurons=list(range(neurons, u["neurons"])))
    return remove_from_block(block, config, decision, layer)


# ----------------------------------------------------------------------------------- biases and whole blocks
@torch.no_grad()
def add_bias(module: nn.Module) -> nn.Parameter:
    """The module's bias; an nn.Linear without one gets a zero bias (same dtype and device) first (FLAP's bias
    compensation on Llama's bias-free o_proj / down_proj). The export records it (``pruned_biases``)."""
    if module.bias is None:
        w = module.weight
        module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)
    return module.bias


def remove_blocks(model: nn.Module, layers) -> list[int]:
    """Physically delete whole decoder blocks (ShortGPT); returns the kept blocks' indices before the call.

    The attention modules' ``layer_idx`` is renumbered (KV caches index by it), ``config.num_hidden_layers`` (GPT-2:
    ``n_layer``) and ``config.layer_types`` follow, ``config.pruned_layers`` is renumbered, and
    ``config.removed_layers`` lists the removed blocks in the numbering of the original model (cumulative)."""
    blocks, config = get_blocks(model), model.config
    n = len(blocks)
    drop = _check(layers, n, "block", "remove_blocks")
    if len(drop) == n:
        raise ValueError(f"remove_blocks: cannot remove all {n} blocks ({drop}); keep at least one")
    kept = [i for i in range(n) if i not in drop]
    removed = list(getattr(config, "removed_layers", None) or [])
    original = [i for i in range(n + len(removed)) if i not in removed]  # current index -> original index
    parent_path, _, name = blocks_path(model).rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, nn.ModuleList([blocks[i] for i in kept]))
    for new, block in enumerate(get_blocks(model)):
        for module in block.modules():  # self-attention (and GPT-2's cross-attention): caches index by layer_idx
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    record = getattr(config, "pruned_layers", None) or {}
    if record:
        config.pruned_layers = {str(new): record[str(old)] for new, old in enumerate(kept) if str(old) in record}
    config.removed_layers = sorted(removed + [original[i] for i in drop])
    return kept
