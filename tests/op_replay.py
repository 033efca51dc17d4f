"""A CPU stand-in for CUDA graphs: record a step's dispatched operators once, replay them on the same tensors.

``RecordedOps`` is a :class:`samatch.step_graph.GraphBackend`. Its capture runs the step while a
dispatch mode records every operator (the backward pass's and the optimizers' too) with its
arguments and outputs; a replay runs the recorded operators again, in order, on the same tensors:
an operator that writes its arguments writes them again, an operator that returns a new tensor has
the result copied into the tensor it returned at capture (later operators read that one), and a view
needs nothing (it shares its base's memory). Python does not run again, as with a CUDA graph, so
whatever the step decided on the host at capture is frozen: a learning rate passed as a float, a
branch on the iteration, a batch drawn from a generator the recording was not given.

What would not work in a CUDA graph fails here at capture: reading a tensor's value on the host
(``.item()``, ``bool(t)``, ``torch.equal``, ``nonzero``, which wait for the GPU) and drawing from a
generator not registered with the recording. And at replay: reading a tensor that was freed since
the capture. A CUDA graph holds only the addresses of the tensors it did not make (parameters,
optimizer state, inputs), so after ``optimizer.state.clear()`` it would read freed memory; the
recording holds such tensors weakly and raises when one is gone. (Tensors only the recording refers
to after its capture, such as constants made during it, it keeps, as a graph's pool keeps its own.)
What it cannot see: a host tensor copied to the GPU during capture, or read once by a kernel when it
is recorded (there is no GPU; :func:`samatch.transfer.to_device` guards the copy on CUDA).
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
# Outputs whose size depends on the values: the host must read them first.
VALUE_SIZED = {aten.nonzero, aten.masked_select, aten.unique_dim, aten._unique2, aten.repeat_interleave}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _reads_host(func, args) -> bool:
    if func in HOST_READS or func.overloadpacket in VALUE_SIZED:
        return True
    # Indexing with a boolean mask finds the mask's True positions first (a nonzero).
    return func.overloadpacket in INDEXING and any(
        isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1])
    )


class _Recorder(TorchDispatchMode):
    def __init__(self, generators):
        super().__init__()
        self.generators = generators
        self.ops: list[tuple] = []
        self.made: set[int] = set()  # storages of the recorded operators' outputs (the "pool")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_host(func, args):
            raise RuntimeError(f"{func} reads tensor values on the host inside a recorded step")
        gen = kwargs.get("generator")
        if gen is not None and not any(_same(gen, g) for g in self.generators):
            raise RuntimeError(f"{func} draws from a generator the recording was not given")
        out = func(*args, **kwargs)
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        ins = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        # Outputs that share an input's memory (views) are refreshed with it; the others get copies.
        outs = tree_leaves(out)
        fresh = [
            i
            for i, t in enumerate(outs)
            if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in ins
        ]
        if writes or fresh:  # a pure view needs no replay
            self.ops.append((func, args, kwargs, out, fresh))
            self.made.update(outs[i].untyped_storage().data_ptr() for i in fresh)
        return out

    def hold_outside_tensors_weakly(self) -> list[torch.Tensor]:
        """After the capture: every argument tensor outside the pool that something else still refers
        to becomes a weak reference, as a CUDA graph keeps only its address. Returns the ones only the
        recording refers to (constants of the step), which it must keep alive itself."""
        outside: dict[int, torch.Tensor] = {}

        def weak(x):
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in self.made:
                outside[id(x)] = x
                return weakref.ref(x)
            return x

        self.ops = [(f, tree_map(weak, a), tree_map(weak, k), o, fr) for f, a, k, o, fr in self.ops]
        kept = []
        for key in list(outside):
            t = outside.pop(key)
            if sys.getrefcount(t) <= 2:  # this name and getrefcount's argument: nobody else's
                kept.append(t)
        return kept


def _same(a: torch.Generator, b: torch.Generator) -> bool:
    """Whether two generator handles are one generator. Dispatch hands operators a new Python object
    for the same generator, so compare what they hold: device and state (generators seeded apart
    never share a state in practice)."""
    return a.device == b.device and torch.equal(a.get_state(), b.get_state())


class RecordedOps:
    """:class:`samatch.step_graph.GraphBackend` for any device, by operator replay (see the module)."""

    def __init__(self, generators=()):
        self.generators = list(generators)
        self.ops: list[tuple] = []
        self.kept: list[torch.Tensor] = []
        self._captured_ran = False

    def warm(self, fn):
        return fn()

    def capture(self, fn):
        recorder = _Recorder(self.generators)
        with recorder:
            out = fn()
        self.kept = recorder.hold_outside_tensors_weakly()
        self.ops = recorder.ops
        self._captured_ran = True  # unlike a CUDA graph's, this capture computed the step already
        return out

    def release(self) -> None:
        self.ops, self.kept = [], []

    def replay(self) -> None:
        if self._captured_ran:
            self._captured_ran = False
            return
        # The operators were recorded below autograd (its own operators, the backward's, are among
        # them): run them there again.
        with torch._C._AutoDispatchBelowADInplaceOrView():
            for func, args, kwargs, out, fresh in self.ops:
                args, kwargs = tree_map(_alive, args), tree_map(_alive, kwargs)
                new = func(*args, **kwargs)
                olds, news = tree_leaves(out), tree_leaves(new)
                for i in fresh:
                    olds[i].copy_(news[i])


def _alive(x):
    if not isinstance(x, weakref.ref):
        return x
    t = x()
    if t is None:
        raise RuntimeError(
            "a tensor the recorded step reads was freed after its capture (a CUDA graph would read freed "
            "memory): reset the step graph when state is replaced rather than updated in place"
        )
    return t
