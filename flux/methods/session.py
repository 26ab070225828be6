"""A participant's round on the shared global model, as a context manager.

Every method's local round has the same skeleton: install the method's layout of the experts
(a merged / dropped / quantized view, or nothing), make exactly the parameters it trains
trainable, remember the global dense values, reset the routing counters, train, take the
deltas, and leave the global model as it was (views removed without write-back, dense values
restored, everything frozen again) -- also when the round fails half-way::

    with method.session(ctx, round_idx, pid) as s:
        with s.overhead():
            install_the_layout(...)
        s.begin()                      # dense + the views' trainable stacks
        stats = s.train()
        with s.overhead():
            deltas, tokens = s.view_deltas(routed_only=True)
        return s.upload(stats, deltas, tokens, peak_memory_bytes=..., profile=profile)
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Optional

from torch import nn

from flux.federation.update import Update


class ParticipantSession:
    """One participant's round (module docstring).  Build it with ``method.session(...)``.

    Attributes:
        dense: the non-expert parameters that train, by name.
        trainable: everything made trainable by :meth:`begin`, by name.
        overhead_s: wall seconds spent inside :meth:`overhead` blocks.
    """

    def __init__(self, method, ctx, round_idx: int, pid: int) -> None:
        self.method, self.ctx, self.round_idx, self.pid = method, ctx, round_idx, pid
        self.handle, self.model = ctx.work.handle, ctx.work.model
        self.dense: dict[str, nn.Parameter] = {}
        self.trainable: dict[str, nn.Parameter] = {}
        self.overhead_s = 0.0
        self._before_dense: Optional[dict] = None

    def __enter__(self) -> "ParticipantSession":
        self.dense = self.method.dense_parameters(self.ctx)
        return self

    def __exit__(self, *exc: Any) -> None:
        from flux.federation.local import restore
        from flux.federation.workload import set_requires_grad

        for layer in self.handle.moe_layers:
            if layer.view is not None:
                layer.remove_view(write_back=False)
        if self._before_dense is not None:  # the round failed before its dense deltas were taken
            restore(self.dense, self._before_dense)
        set_requires_grad(self.model, None)

    @contextlib.contextmanager
    def overhead(self) -> Iterator[None]:
        """Time the block as method overhead (merging, selection, bookkeeping), not training."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.overhead_s += time.perf_counter() - t0

    def view_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable stacks of the installed views, by a position name."""
        return {f"__view{l}.{i}": p for l, layer in enumerate(self.handle.moe_layers)
                for i, p in enumerate(layer.trainable_parameters())}

    def begin(self, *, views: bool = True, extra: Optional[dict[str, nn.Parameter]] = None) -> dict[str, nn.Parameter]:
        """Make the dense parameters, the views' trainable stacks (``views``) and ``extra``
        trainable (everything else frozen), remember the dense values, reset the routing counts.
        Returns the trainable parameters by name (dense first)."""
        from flux.federation.local import snapshot
        from flux.federation.workload import set_requires_grad

        self.trainable = {**self.dense, **(self.view_parameters() if views else {}), **(extra or {})}
        set_requires_grad(self.model, self.trainable)
        self._before_dense = snapshot(self.dense)
        self.handle.reset_counts()
        return self.trainable

    def train(self, params=None, **hooks):
        """The method's local loop on ``params`` (default: everything :meth:`begin` made
        trainable); ``hooks`` as :func:`flux.federation.local.train_local`."""
        chosen = list(self.trainable.values()) if params is None else list(params)
        return self.method.train(self.ctx, self.round_idx, self.pid, chosen, **hooks)

    def view_deltas(self, *, routed_only: bool, extra: Optional[dict[int, dict]] = None) -> tuple[dict, dict]:
        """:func:`flux.methods.uploads.view_expert_deltas` with this round's routed tokens."""
        from flux.methods.uploads import expert_tokens, view_expert_deltas

        return view_expert_deltas(self.handle, expert_tokens(self.handle), routed_only=routed_only, extra=extra)

    def dense_deltas(self) -> dict:
        """Deltas of the dense parameters; puts the global values back."""
        from flux.federation.local import take_deltas

        if self._before_dense is None:
            return {}
        deltas = take_deltas(self.dense, self._before_dense)
        self._before_dense = None
        return deltas

    def upload(self, stats, deltas: dict, tokens: dict, *, peak_memory_bytes: int, profile: Any = None,
               dense_deltas: Optional[dict] = None, **costs: Any) -> Update:
        """The participant's :class:`Update` (:func:`flux.methods.uploads.make_update`): its
        dense deltas are taken here unless given; ``profile``'s seconds are its profiling cost;
        the session's :attr:`overhead_s` is added to ``costs["overhead_s"]``; with ``upload_bits``
        the deltas are sent as int-N copies (flux/federation/compression.py) and the bytes up are
        their packed size."""
        from flux.federation.compression import compress_deltas
        from flux.methods.uploads import make_update

        dense = self.dense_deltas() if dense_deltas is None else dense_deltas
        # what the server receives: with upload_bits, the int-N round trip of every delta
        deltas, dense, wire_bytes = compress_deltas(deltas, dense, self.ctx.cfg.upload_bits)
        costs["overhead_s"] = costs.get("overhead_s", 0.0) + self.overhead_s
        if profile is not None:
            costs.setdefault("profile_s", float(getattr(profile, "seconds", 0.0)))
        return make_update(self.pid, stats, self.model, deltas, tokens, dense, peak_memory_bytes=peak_memory_bytes,
                           bytes_up=wire_bytes, **costs)
