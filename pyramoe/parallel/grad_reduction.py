"""Gradient reduction overlapped with the backward, in buckets, as DDP does it.

Every trainable parameter belongs to one reduction group: non-expert parameters to the
data-parallel group, expert parameters to their layer's expert-data-parallel group, and a
parameter whose gradient on a TP rank covers a share (`ParallelState.tp_partial`) to that group
with its TP partners (one reduction sums over both). Parameters are put in buckets per group, in
the reverse of their registration order (roughly the order the backward finishes them), up to
`bucket_bytes` each.

On the last micro-batch's backward (`arm`), a post-accumulate-grad hook counts each parameter in;
when a bucket holds all of its gradients it is flattened, divided by DP and all-reduced
asynchronously while the backward goes on. Buckets are launched strictly in bucket order, so every
rank issues the same collectives in the same order whatever order its gradients finish in. `finish`
launches what is left (a parameter that got no gradient counts as zero), waits, and writes the
reduced values back: the optimizer step comes after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket_cap_mb


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    group: dist.ProcessGroup | None
    ready: int = 0  # parameters whose gradient is final for this step
    flat: torch.Tensor | None = None  # the reduced (or being reduced) gradients, flattened
    work: dist.Work | None = None


@dataclass
class BucketedGradReduction:
    buckets: list[_Bucket]
    dp: int  # the reference loss is the mean over data-parallel ranks
    _bucket_of: dict[int, int] = field(default_factory=dict)
    _armed: bool = False
    _next: int = 0  # the first bucket not launched yet
    _hooks: list = field(default_factory=list)

    @classmethod
    def build(
        cls, params: list[nn.Parameter], group_of: Callable[[nn.Parameter], tuple[object, dist.ProcessGroup | None]],
        dp: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> BucketedGradReduction:
        """Buckets of `params` (the model's unique trainable parameters, in registration order);
        `group_of(p)` gives a parameter's reduction key and process group."""
        buckets: list[_Bucket] = []
        open_buckets: dict[object, tuple[_Bucket, int]] = {}  # key -> (bucket, its bytes so far)
        for param in reversed(params):
            key, group = group_of(param)
            bucket, size = open_buckets.get(key, (None, 0))
            if bucket is None:
                bucket = _Bucket([], group)
            bucket.params.append(param)
            size += param.numel() * param.element_size()
            if size >= bucket_bytes:
                buckets.append(bucket)
                open_buckets.pop(key, None)
            else:
                open_buckets[key] = (bucket, size)
        buckets.extend(bucket for bucket, _ in open_buckets.values())
        reduction = cls(buckets, dp)
        for index, bucket in enumerate(buckets):
            for param in bucket.params:
                reduction._bucket_of[id(param)] = index
                reduction._hooks.append(param.register_post_accumulate_grad_hook(reduction._on_gradient))
        return reduction

    def arm(self) -> None:
        """The next backward completes this step's gradients (the last micro-batch): reduce each
        bucket as soon as it is complete. Earlier micro-batches only accumulate, as under DDP's
        no_sync."""
        self._armed = True

    def finish(self) -> None:
        """Launch the buckets not launched yet, wait for all, and write the reduced gradients back."""
        self._launch_up_to(len(self.buckets))
        for bucket in self.buckets:
            bucket.work.wait()
            grads = [p.grad for p in bucket.params]
            for grad, reduced in zip(grads, _unflatten_dense_tensors(bucket.flat, grads)):
                grad.copy_(reduced)
            bucket.ready, bucket.flat, bucket.work = 0, None, None
        self._armed, self._next = False, 0

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _on_gradient(self, param: nn.Parameter) -> None:
        if not self._armed:
            return
        index = self._bucket_of[id(param)]
        bucket = self.buckets[index]
        bucket.ready += 1
        if bucket.ready == len(bucket.params) and index == self._next:
            # this bucket and the complete ones queued behind it, in order
            end = index + 1
            while end < len(self.buckets) and self.buckets[end].ready == len(self.buckets[end].params):
                end += 1
            self._launch_up_to(end)

    def _launch_up_to(self, end: int) -> None:
        for bucket in self.buckets[self._next : end]:
            for param in bucket.params:
                if param.grad is None:  # no gradient this step: zero, and the reduction still joins
                    param.grad = torch.zeros_like(param)
            bucket.flat = _flatten_dense_tensors([p.grad for p in bucket.params]).div_(self.dp)
            bucket.work = dist.all_reduce(bucket.flat, group=bucket.group, async_op=True)
        self._next = max(self._next, end)
