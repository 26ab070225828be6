"""Save a run's fine-tuned global model in the transformers format it came in.

:func:`export_model` writes, into one directory (replaced atomically):

* the underlying ``*ForCausalLM`` with ``save_pretrained`` (``config.json``, safetensors, the
  generation config): the same files and tensor names as the checkpoint a ``model.path`` run
  started from (``flux.patch`` leaves the format alone), loadable with
  ``AutoModelForCausalLM.from_pretrained``; the config's ``use_cache`` is the checkpoint's own;
* for a classification task, the new head: ``head.safetensors`` (``weight`` ``[num_labels,
  hidden]``, ``bias`` ``[num_labels]``) and ``head.json`` (label names in id order, pooling);
* the tokenizer: the checkpoint's own when it brought one, else FLUX's byte-level BPE as a
  ``PreTrainedTokenizerFast`` (so the directory is self-contained).

:func:`export_run` does it for a run directory from its newest checkpoint (``flux export``).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

HEAD_WEIGHTS = "head.safetensors"
HEAD_INFO = "head.json"


@contextlib.contextmanager
def _original_config(lm, source) -> Iterator[None]:
    """The checkpoint's own ``use_cache`` while saving (the run turned the cache off)."""
    cfg = lm.config
    before = getattr(cfg, "use_cache", None)
    if source is not None and source.use_cache is not None:
        cfg.use_cache = source.use_cache
    try:
        yield
    finally:
        if before is not None:
            cfg.use_cache = before


def export_model(work, out_dir: str | os.PathLike, *, progress: bool = False) -> Path:
    """Write ``work``'s model (a ``flux.federation.workload.Workload``) to ``out_dir`` (see the
    module doc); returns ``out_dir``.  An existing ``out_dir`` is replaced once the new one is
    complete."""
    import transformers
    from safetensors.torch import save_file

    from flux.data.cache import atomic_dir
    from flux.models.classifier import MoEClassifier

    model = work.model
    lm = model.lm
    out = Path(out_dir)
    source = getattr(work, "source", None)
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        with atomic_dir(out) as tmp, _original_config(lm, source):
            lm.save_pretrained(str(tmp))
            info = {"task": work.kind, "model_type": str(getattr(lm.config, "model_type", "")),
                    "source": source.path if source is not None else None}
            if isinstance(model, MoEClassifier):
                head = model.head
                save_file({"weight": head.weight.detach().contiguous().cpu(),
                           "bias": head.bias.detach().contiguous().cpu()}, str(tmp / HEAD_WEIGHTS))
                info.update(num_labels=model.num_labels, label_names=list(work.label_names),
                            hidden_size=int(head.in_features),
                            pooling="masked mean of the base model's last hidden states (attention_mask)")
                (tmp / HEAD_INFO).write_text(json.dumps(info, indent=2) + "\n")
            _save_tokenizer(getattr(work, "tokenizer", None), tmp)
    finally:
        if not progress:
            transformers.utils.logging.enable_progress_bar()
    return out


def _save_tokenizer(tokenizer, out: Path) -> None:
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save_pretrained"):  # flux.data.hf_tokenizer.HFTokenizer: the checkpoint's own
        tokenizer.save_pretrained(out)
    elif hasattr(tokenizer, "to_hf"):  # our byte-level BPE
        tokenizer.to_hf().save_pretrained(str(out))


def load_head(model_dir: str | os.PathLike):
    """``(nn.Linear, label_names)`` of a classification export (``head.safetensors`` + ``head.json``)."""
    import torch
    from safetensors.torch import load_file

    d = Path(model_dir)
    info = json.loads((d / HEAD_INFO).read_text())
    tensors = load_file(str(d / HEAD_WEIGHTS))
    head = torch.nn.Linear(tensors["weight"].shape[1], tensors["weight"].shape[0], dtype=tensors["weight"].dtype)
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])
    return head, list(info["label_names"])


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = False) -> tuple[Path, int]:
    """Rebuild the workload of ``run_dir/config.toml``, load the model state of its newest
    checkpoint (:func:`flux.federation.reload.load_run`) and :func:`export_model` it to
    ``out_dir``.  Returns ``(out_dir, rounds completed)``.

    Raises:
        FileNotFoundError: no ``config.toml`` in ``run_dir``.
        LookupError: the run has no readable checkpoint.
        flux.federation.errors.ConfigError: the saved config is invalid here.
    """
    from flux.federation.reload import load_run

    work, rounds = load_run(run_dir, progress=progress)
    return export_model(work, out_dir, progress=progress), rounds
