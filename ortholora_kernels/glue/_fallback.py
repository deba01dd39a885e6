"""A minimal Ortho-LoRA projector used only when ``ortholora_kernels.OrthoLoRA`` is absent.

Same calling convention as the package's projector (``backward(losses)`` or
``record(task_ids)`` + one backward, then ``project_()``), but it always collects with one
backward per task (``record`` keeps the summed backward for the heads and recomputes the
per-task LoRA gradients with ``torch.autograd.grad``). Slow but simple; the harness uses
the package's fused projector whenever it exists.
"""
from __future__ import annotations

import contextlib
import re

import torch

from ..ops import project


class LoopProjector:
    def __init__(self, model, num_tasks, granularity="ab", collect="grouped", seed=0, backend=None):
        self.num_tasks = num_tasks
        self.backend = backend
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
        if not params:
            raise ValueError("model: no trainable LoRA parameters")
        side = lambda n: 0 if ".lora_A." in n else 1  # noqa: E731
        layer = lambda n: (re.match(r"^(.*?\.\d+)(?:\.|$)", n) or re.match("(.*)", n)).group(1)  # noqa: E731
        ranks = {}
        for n, _ in params:
            ranks.setdefault(layer(n), len(ranks))
        order = sorted(range(len(params)), key=lambda i: (side(params[i][0]), ranks[layer(params[i][0])], i))
        self.params = [params[i][1] for i in order]
        names = [params[i][0] for i in order]
        offs = [0]
        for p in self.params:
            offs.append(offs[-1] + p.numel())
        n_a = sum(p.numel() for nm, p in zip(names, self.params) if side(nm) == 0)
        if granularity == "global":
            self.offsets = [0, offs[-1]]
        elif granularity == "ab":
            self.offsets = sorted({0, n_a, offs[-1]})
        elif granularity == "matrix":
            self.offsets = offs
        else:  # layer
            cut = [0]
            for i in range(1, len(names)):
                if (side(names[i]), layer(names[i])) != (side(names[i - 1]), layer(names[i - 1])):
                    cut.append(offs[i])
            self.offsets = cut + [offs[-1]]
        dev = self.params[0].device
        self.generator = torch.Generator(device=dev)
        self.generator.manual_seed(seed)
        self.buffer = None
        self._losses = None

    def backward(self, losses):
        rows = []
        for t, loss in enumerate(losses):
            g = torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                   for x, p in zip(g, self.params)]))
        self.buffer = torch.stack(rows)
        # heads (and everything else) get their ordinary gradients; LoRA .grad is
        # overwritten by project_()
        torch.stack(list(losses)).sum().backward()

    @contextlib.contextmanager
    def record(self, task_ids):
        raise NotImplementedError("the fallback projector supports collect='loop' only")

    def project_(self):
        res = project(self.buffer, self.offsets, generator=self.generator, backend=self.backend, return_stats=True)
        out = res.output
        i = 0
        for p in self.params:
            p.grad = out[i:i + p.numel()].view_as(p).to(p.dtype)
            i += p.numel()
        return res
