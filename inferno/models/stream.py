"""Causal LMs larger than memory (``model.stream=true``): the decoder blocks stay in the model folder's safetensors
and are materialised one at a time.

:func:`stream_causal_lm` builds the model's skeleton with every parameter on the ``meta`` device (no memory;
non-persistent buffers such as the rotary frequencies are computed for real), then loads what lies outside the
decoder blocks -- embeddings, final norm, LM head -- for real: they make the calibration inputs and the logits. The
blocks are reached through a :class:`BlockStore`, which is at once

* the calibration runner's **block source** (``runner.block_source``): ``open(i, device)`` reads block ``i``'s
  tensors from the safetensors (memory-mapped through ``safe_open``, copied out, the file closed again) into the
  skeleton, ``close(i, changed)`` writes it to the output folder when it was pruned and puts it back on ``meta``
  -- so the runner prunes exactly as it does in memory, one resident block at a time;
* a **forward hook** on every block: a block that is not resident when the model calls it is loaded for that call
  and released after it, so ``model(input_ids)`` -- perplexity, the harness, the cost model -- runs with one block
  in memory (blocks are read once per forward: per evaluation batch, not once per run).

Peak memory is about one block + the calibration activations + the non-block weights. :meth:`BlockStore.writing`
writes a pruned model as Hugging Face does a sharded one (``model-0000k-of-0000n.safetensors``, one shard per block
and one for the rest, ``model.safetensors.index.json``, config.json): ``from_pretrained``, ``load_pruned`` and
``model.stream=true`` all read it, and the store reads from it afterwards (the streamed model *is* the pruned one).
"""

from __future__ import annotations

import ctypes
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from inferno.errors import ConfigError

INDEX = "model.safetensors.index.json"
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 << 10  # glibc's initial value, kept fixed


def give_freed_blocks_back() -> bool:
    """Make the memory of a released block go back to the OS (glibc; elsewhere nothing is done, False).

    glibc's malloc raises its mmap threshold to the size of every large chunk that is freed (up to 32 MiB): once
    the first block is released, the next blocks' tensors (MiBs to tens of MiBs each) are served from the heap,
    whose freed memory the process keeps -- the resident set then climbed by about a block per block read, to ~80 %
    of the in-memory run's peak on a 1.4 GB Llama (results/stream). Setting the threshold, to glibc's initial 128 KiB,
    turns that adjustment off: every allocation of 128 KiB or more (a block's tensors, most activations) gets its
    own mapping, returned when freed (process-wide, as ``MALLOC_MMAP_THRESHOLD_=131072`` would). With 1 MiB the
    blocks were returned but the activations of 128 KiB - 1 MiB still fragmented the heap (+140 MB there)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def checkpoint_files(path: Path) -> dict[str, Path]:
    """{tensor name in the files: file} of a folder's safetensors (sharded with an index, or one file)."""
    from safetensors import safe_open

    index, single = path / INDEX, path / "model.safetensors"
    if index.is_file():
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise ConfigError(f"model.stream: no safetensors in {path} (model.safetensors or {INDEX}); "
                      "model.stream=true needs a local folder of safetensors (model=hf_causal_lm model.path=DIR)")


def _tensors(module: nn.Module, buffers: bool = True):
    """(owner module, attribute, full name) of every parameter and persistent buffer of ``module``."""
    for prefix, mod in module.named_modules():
        names = list(mod._parameters)
        if buffers:
            names += [n for n in mod._buffers if n not in mod._non_persistent_buffers_set]
        for name in names:
            if getattr(mod, name) is not None:
                yield mod, name, f"{prefix}.{name}" if prefix else name


def _set(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in mod._parameters:
        mod._parameters[name] = nn.Parameter(value, requires_grad=mod._parameters[name].requires_grad)
    else:
        mod._buffers[name] = value


class BlockStore:
    """The decoder blocks of ``model`` (a skeleton on ``meta``) read from, and written to, folders of safetensors
    (see the module docstring). ``peak_resident``: the most blocks materialised at once so far."""

    def __init__(self, model: nn.Module, path, dtype: torch.dtype):
        from inferno.pruning.llm.runner import blocks_path, get_blocks

        self.model, self.blocks, self.prefix, self.dtype = model, get_blocks(model), blocks_path(model), dtype
        self.resident: set[int] = set()
        self.peak_resident = 0
        self._called: set[int] = set()  # blocks loaded by the forward hook for one call
        self._out: Path | None = None
        self._written: dict[str, str] = {}  # tensor -> shard of the output being written
        self.read_from(path)

    # ------------------------------------------------------------------ reading
    def read_from(self, path) -> None:
        """Read blocks from the safetensors of folder ``path`` from now on."""
        self.path = Path(path)
        self.files = checkpoint_files(self.path)
        self._strip = self.model.base_model_prefix + "."  # GPT-2-style files name tensors without the model prefix

    def _file_key(self, key: str) -> str | None:
        if key in self.files:
            return key
        short = key.removeprefix(self._strip)
        return short if short in self.files else None

    def read(self, keys: list[str], device) -> dict[str, torch.Tensor]:
        """The tensors ``keys`` (the model's names) from the files, copied to ``device`` (floating ones in the
        working dtype); each file is memory-mapped only while its tensors are copied out. Missing keys are absent."""
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[str, str]]] = {}
        for key in keys:
            fk = self._file_key(key)
            if fk is not None:
                by_file.setdefault(self.files[fk], []).append((key, fk))
        out = {}
        for file, pairs in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for key, fk in pairs:
                    t = f.get_tensor(fk)  # a view of the mapped file: copied, never written through
                    out[key] = t.to(device=device, dtype=self.dtype if t.is_floating_point() else t.dtype, copy=True)
        return out

    def load_outside_blocks(self, device) -> None:
        """Every tensor outside the decoder blocks, for real (tied embeddings re-tied); one missing is an error."""
        outside = [(m, n, k) for m, n, k in _tensors(self.model) if not k.startswith(self.prefix + ".")]
        values = self.read([k for _, _, k in outside], device)
        for mod, name, key in outside:
            if key in values:
                _set(mod, name, values.pop(key))
        if getattr(self.model.config.get_text_config(), "tie_word_embeddings", False):
            self.model.tie_weights()
        missing = [k for m, n, k in _tensors(self.model) if not k.startswith(self.prefix + ".")
                   and getattr(m, n).is_meta]
        if missing:
            raise ConfigError(f"model.path: {self.path} lacks tensors the model needs: {missing[:5]}")

    # ------------------------------------------------------------------ the runner's block source
    def open(self, i: int, device) -> nn.Module:
        """Block ``i`` materialised on ``device`` from the current folder."""
        block = self.blocks[i]
        if i not in self.resident:
            own = list(_tensors(block))
            values = self.read([f"{self.prefix}.{i}.{k}" for _, _, k in own], device)
            for mod, name, key in own:
                full = f"{self.prefix}.{i}.{key}"
                if full not in values:
                    raise ConfigError(f"model.path: {self.path} has no tensor {full}")
                _set(mod, name, values.pop(full))
            self.resident.add(i)
            self.peak_resident = max(self.peak_resident, len(self.resident))
        for mod in block.modules():  # non-persistent buffers (computed at build) follow the block
            for name, b in mod._buffers.items():
                if b is not None and not b.is_meta:
                    mod._buffers[name] = b.to(device)
        return block

    def close(self, i: int, changed: bool) -> None:
        """The visit of block ``i`` is over: written to the output being written if ``changed``, then back on meta."""
        if changed and self._out is not None:
            self._write_block(i)
        block = self.blocks[i]
        for mod, name, _ in _tensors(block):
            _set(mod, name, torch.empty_like(getattr(mod, name), device="meta"))
        self.resident.discard(i)

    # ------------------------------------------------------------------ forward hooks (evaluation)
    def install_hooks(self) -> None:
        """A block the model calls while it is not resident is loaded for the call (onto the hidden states'
        device) and released after it."""
        for i, block in enumerate(self.blocks):
            block.register_forward_pre_hook(self._pre(i), with_kwargs=True)
            block.register_forward_hook(self._post(i), always_call=True)

    def _pre(self, i: int):
        def hook(mod, args, kwargs):
            if i not in self.resident:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.open(i, hidden.device)
                self._called.add(i)

        return hook

    def _post(self, i: int):
        def hook(mod, args, out):
            if i in self._called:
                self._called.discard(i)
                self.close(i, False)

        return hook

    # ------------------------------------------------------------------ writing
    def _shard(self, k: int) -> str:
        return f"model-{k:05d}-of-{len(self.blocks) + 1:05d}.safetensors"

    def _save(self, tensors: dict[str, torch.Tensor], shard: str) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(self._out / shard),
                  metadata={"format": "pt"})
        self._written |= dict.fromkeys(tensors, shard)

    def _write_block(self, i: int) -> None:
        self._save({f"{self.prefix}.{i}.{k}": getattr(m, n) for m, n, k in _tensors(self.blocks[i])}, self._shard(i + 2))

    @contextmanager
    def writing(self, out, progress: bool = False):
        """Write the model to folder ``out`` while the block is in use: every block closed with ``changed`` inside
        is written as it is released; on exit the blocks not written are copied from the current folder, the
        tensors outside the blocks, the index and config.json are written, and the store reads from ``out``."""
        from tqdm.auto import tqdm

        out = Path(out)
        if out.resolve() == self.path.resolve():
            raise ConfigError(f"model.stream: cannot write the model into the folder it is read from ({out})")
        out.mkdir(parents=True, exist_ok=True)
        for stale in [*out.glob("model*.safetensors"), out / INDEX]:
            stale.unlink(missing_ok=True)
        self._out, self._written = out, {}
        try:
            yield out
            written = {int(k[len(self.prefix) + 1:].split(".", 1)[0]) for k in self._written}
            for i in tqdm([i for i in range(len(self.blocks)) if i not in written], desc="stream[copy]",
                          disable=not progress, leave=False):
                self.open(i, "cpu")
                self.close(i, True)
            seen, rest = set(), {}
            for mod, name, key in _tensors(self.model):  # outside the blocks; a tied tensor once (HF's choice)
                t = getattr(mod, name)
                if not key.startswith(self.prefix + ".") and id(t) not in seen:
                    seen.add(id(t))
                    rest[key] = t
            self._save(rest, self._shard(1))
            total = sum((out / s).stat().st_size for s in set(self._written.values()))
            (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": dict(sorted(self._written.items()))}, indent=2))
            self.model.config.save_pretrained(out)
            if getattr(self.model, "generation_config", None) is not None:
                self.model.generation_config.save_pretrained(out)
        finally:
            self._out = None
        self.read_from(out)

    def save(self, out) -> None:
        """The model as it is on disk now, copied block by block into ``out`` (nothing to do if it is there)."""
        if Path(out).resolve() != self.path.resolve():
            with self.writing(out):
                pass


def is_streamed(model: nn.Module) -> bool:
    return isinstance(getattr(model, "block_source", None), BlockStore)


def stream_causal_lm(path, dtype: torch.dtype | str | None = torch.float32, device="cpu") -> nn.Module:
    """A causal LM from a local folder of safetensors whose decoder blocks stay on disk (see the module docstring),
    in eval mode; the tensors outside the blocks on ``device``. ``model.block_source`` is its :class:`BlockStore`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.stream: {path} is not a local Hugging Face model folder (config.json + safetensors)")
    checkpoint_files(path)  # no safetensors: refused before anything is built
    give_freed_blocks_back()
    config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    if getattr(config, "pruned_layers", None) or getattr(config, "pruned_biases", None):
        raise ConfigError(f"model.stream: {path} holds a structurally pruned model (per-layer sizes); load it with "
                          "model.stream=false")
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    store = BlockStore(model, path, dtype)
    store.load_outside_blocks(device)
    # the blocks live on disk: to() / cuda() / float() of the model move what is resident; a block is loaded onto
    # the device of the hidden states it is called with
    store.blocks._apply = lambda fn, recurse=True: store.blocks
    model.block_source = store
    store.install_hooks()
    return model.eval()


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers that are not on meta (what is in memory now)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if not t.is_meta)
