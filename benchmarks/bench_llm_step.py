"""Multi-task LoRA fine-tuning step of a decoder LLM: joint vs Ortho-LoRA loop vs grouped.

    python benchmarks/bench_llm_step.py --quick            # CPU, a reduced Llama, a few minutes
    python benchmarks/bench_llm_step.py                    # GPU: the Llama-3-8B config in bf16

Answers the paper's open question 3 (is Ortho-LoRA affordable on billion-parameter LLMs?)
with time per step and peak memory. The model is ``transformers``' Llama architecture built
from a ``LlamaConfig`` with random weights (nothing is downloaded): ``--quick`` a reduced
Llama (2 layers, hidden 256, GQA 4/2 heads, vocabulary 4096, sequences of 256 tokens, fp32,
CPU); the default the Llama-3-8B configuration (32 layers, hidden 4096, GQA 32/8 heads,
intermediate 14336, vocabulary 128256, rope theta 500000) in bf16 with sequences of 1024.
peft LoRA r=16 (alpha 32, dropout 0.05) on every linear layer of every block (q, k, v, o,
gate, up, down projections), B drawn at random (std 0.02, as after some training, so that A
has gradients too); the causal-LM loss of each task is the mean over its tokens.

Data: ``--rows`` packed sequences per step whatever T (the same number of tokens, so the
figures show what T itself costs). Every sequence holds ``--docs-per-row`` documents of
equal length, each of one task; documents attend only to themselves (block-diagonal causal
mask, positions restart per document), so a document's loss depends on its own tokens only
and the per-task gradient is well defined on a packed batch:

* joint:   one forward/backward of ``sum_t mean-loss_t`` over the packed batch (documents of
           all tasks mixed in every sequence), plain peft gradients: the cost floor;
* loop:    the paper's method: per task a forward and a backward over that task's documents
           alone (packed into ``rows/T`` sequences), gradients copied into the ``[T, N]``
           buffer, projection (``granularity="ab"``);
* grouped: one forward/backward over the packed batch, per-task LoRA weight gradients
           written by the grouped collector, projection. With per-token task ids
           (``record`` taking ``[batch, seq]`` ids, feature-detected at start) it uses the
           same mixed packing as joint; otherwise every sequence holds documents of one
           task only (``[batch]`` ids; the output says which).

Before timing, the grouped per-task gradients are checked against the loop's on the same
weights (dropout off): the relative error is printed (and the run stops when it exceeds 1e-3
in fp32 / 5e-2 in bf16).

Timing: all methods share one model (same weights) in one process and run interleaved in a
rotating order, ``--warmup`` rounds then ``--repeat`` rounds, so that load changes on a shared
machine hit every method alike. "x joint" is the median over rounds of (method time / joint
time of the same round). The grouped collector patches the LoRA layers' forward, so its
``OrthoLoRA`` is built before and removed after each of its steps (outside the timed
region; its ``[T, N]`` buffer is allocated before timing). Peak memory: one more step per
method, CUDA ``max_memory_allocated`` or, on CPU, glibc's in-use bytes sampled after every aten
op (``bench_train_step``'s tracker), minus the value before the step and before that method's
``OrthoLoRA`` and buffer were built (so the buffer counts); weights and the optimizer state
exist for every method alike and are not counted.

The last line prints ``grouped/joint = R.RR, loop/joint = R.RR`` for the largest T.

``--sft``: the same documents through TRL instead (``python benchmarks/bench_llm_step.py
--quick --sft``): one optimizer step through the trainer (``training_step``: TRL's forward
with its fused LM head and metrics, the backward; then gradient clipping, the optimizer
and scheduler steps), ``sft-joint`` = TRL's ``SFTTrainer``, ``sft-grouped`` =
``OrthoLoRASFTTrainer`` (per-token task ids, grouped collection, projection), each on its
own copy of the model (same weights), the same packed padding-free batch (TRL's own
"bfd" packing of the documents), interleaved rounds. It prints
``sft grouped/joint = R.RR`` for the largest T: the trainer's own overhead included.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench_train_step import _malloc_in_use, _peak_tracker  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("joint", "loop", "grouped")

#: Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                 rms_norm_eps=1e-5)
#: a reduced Llama for the CPU run (same block structure, GQA included)
LLAMA_QUICK = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=4096, rope_theta=500000.0, max_position_embeddings=2048,
                   rms_norm_eps=1e-5)


def build_model(args, device, dtype):
    """A random-weight Llama causal LM with peft LoRA on every linear layer of its blocks."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**(LLAMA_QUICK if args.quick else LLAMA3_8B))
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        if getattr(args, k) is not None:
            setattr(cfg, k, getattr(args, k))
    cfg.attention_dropout = 0.0
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)        # built in its dtype on the device: no fp32 copy of 8B weights
    try:
        with torch.device(device):
            base = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.lora_dropout,
                                            target_modules=TARGETS, task_type="CAUSAL_LM"))
    g = torch.Generator(device="cpu").manual_seed(1)
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype != dtype:   # LoRA in the model's dtype (peft may upcast adapters to fp32)
            p.data = p.data.to(dtype)
        if "lora_B" in name:   # B != 0 (as after some training), so A gets gradients and the check covers it
            p.data.copy_(0.02 * torch.randn(p.shape, generator=g))
    model.train()
    return model, cfg


class Batch:
    """One packed batch: ``rows`` sequences of ``docs_per_row`` equal-length documents."""

    def __init__(self, ids, doc_task, doc_len, device):
        rows, seq = ids.shape
        self.ids = ids.to(device)
        k = seq // doc_len
        doc = torch.arange(seq) // doc_len                                   # document index within the row
        same = doc[:, None] == doc[None, :]
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        self.mask = (same & causal)[None, None].expand(rows, 1, seq, seq).to(device)
        self.pos = (torch.arange(seq) % doc_len)[None].expand(rows, seq).to(device)
        self.token_task = doc_task.repeat_interleave(doc_len, dim=1)         # [rows, seq], CPU
        assert self.token_task.shape == (rows, seq) and k * doc_len == seq
        # the target of position i is token i+1 of the same document: drop each document's last position
        keep = (torch.arange(seq) % doc_len) != doc_len - 1
        self.keep = keep.to(device)
        self.target = torch.roll(self.ids, -1, dims=1)
        self.loss_task = self.token_task[:, keep].reshape(-1).to(device)    # task of every counted token
        self.row_task = doc_task[:, 0].clone()                               # valid when rows are task-pure

    def losses(self, model, num_tasks):
        """``[T]`` per-task mean token loss (0 for a task absent from the batch)."""
        from ortholora_kernels import per_task_mean_loss

        logits = model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos).logits
        lg = logits[:, self.keep].float()
        per_tok = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), self.target[:, self.keep].reshape(-1),
                                                    reduction="none")
        return per_task_mean_loss(per_tok, self.loss_task, num_tasks)


def make_data(args, num_tasks, vocab, device):
    """The same documents three ways: mixed packing (documents of all tasks in every row),
    task-pure packing (every row one task, rows sorted by task) and per-task batches (the
    task-pure rows of each task)."""
    rows, dpr = args.rows, args.docs_per_row
    if rows % num_tasks:
        raise SystemExit(f"--rows {rows} must be a multiple of every T (got T={num_tasks})")
    if args.seq_len % dpr:
        raise SystemExit(f"--seq-len {args.seq_len} must be a multiple of --docs-per-row {dpr}")
    doc_len = args.seq_len // dpr
    g = torch.Generator().manual_seed(num_tasks)
    ndocs = rows * dpr
    docs = torch.randint(3, vocab, (ndocs, doc_len), generator=g)
    task = torch.arange(num_tasks).repeat_interleave(ndocs // num_tasks)   # equal documents per task
    pure = Batch(docs.reshape(rows, -1), task.reshape(rows, dpr), doc_len, device)
    perm = torch.randperm(ndocs, generator=g)
    mixed = Batch(docs[perm].reshape(rows, -1), task[perm].reshape(rows, dpr), doc_len, device)
    per = rows // num_tasks
    per_task = [Batch(docs[task == t].reshape(per, -1), task[task == t].reshape(per, dpr), doc_len, device)
                for t in range(num_tasks)]
    return mixed, pure, per_task


def supports_token_ids() -> tuple[bool, str]:
    """Does the installed ``OrthoLoRA.record`` take ``[batch, seq]`` per-token task ids?

    Probed on a tiny peft model: the grouped per-task gradients must equal the loop's."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from ortholora_kernels import OrthoLoRA, per_task_mean_loss

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 5)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    m = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    x = torch.randn(3, 4, 6)
    tid = torch.tensor([[0, 0, 1, 1], [1, 0, 1, 0], [1, 1, 1, 0]])

    def loss():
        return per_task_mean_loss(m(x).pow(2).sum(-1).reshape(-1), tid.reshape(-1), 2)

    loop = OrthoLoRA(m, 2, collect="loop")
    loop.backward(list(loss()))
    want = loop.buffer.clone()
    o = OrthoLoRA(m, 2, collect="grouped")
    try:
        with o.record(tid):
            loss().sum().backward()
    except (ValueError, TypeError, RuntimeError) as e:
        return False, f"record([batch, seq]) refused: {str(e).splitlines()[0]}"
    finally:
        o.remove()
    if not torch.allclose(o.buffer, want, rtol=1e-4, atol=1e-6):
        return False, "record([batch, seq]) accepted but its per-task gradients differ from the loop's"
    return True, "record([batch, seq]) per-token task ids"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Bench:
    """Steps of the three methods on one shared model, for one T."""

    def __init__(self, args, model, num_tasks, device, token_ids):
        from ortholora_kernels import OrthoLoRA

        self.args, self.model, self.t, self.device = args, model, num_tasks, device
        self.mixed, self.pure, self.per_task = make_data(args, num_tasks, model.config.vocab_size, device)
        self.token_ids = token_ids
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5)
        self.loop = OrthoLoRA(model, num_tasks, granularity="ab", collect="loop", seed=0, backend=args.backend)
        self._grouped = None

    def grouped_batch(self):
        if self.token_ids:
            return self.mixed, self.mixed.token_task
        return self.pure, self.pure.row_task

    def attach(self):
        """Build the grouped collector's OrthoLoRA (patches the LoRA layers) and its buffer."""
        from ortholora_kernels import OrthoLoRA

        if self._grouped is None:
            self._grouped = OrthoLoRA(self.model, self.t, granularity="ab", collect="grouped", seed=0,
                                      backend=self.args.backend)
            self._grouped.buffer   # allocated now, not inside the timed step
        return self._grouped

    def detach(self):
        if self._grouped is not None:
            self._grouped.remove()
            self._grouped = None

    def grads(self, method):
        """Forward/backward of one method: LoRA .grad (joint) or the per-task buffer rows."""
        if method == "joint":
            self.mixed.losses(self.model, self.t).sum().backward()
        elif method == "loop":
            for k, b in enumerate(self.per_task):
                with self.loop.task(k):
                    b.losses(self.model, self.t)[k].backward()
        else:
            batch, ids = self.grouped_batch()
            with self._grouped.record(ids):
                batch.losses(self.model, self.t).sum().backward()

    def step(self, method):
        """One optimizer step of ``method`` (the grouped OrthoLoRA must be attached)."""
        self.grads(method)
        if method == "loop":
            self.loop.project_()
        elif method == "grouped":
            self._grouped.project_()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def check(self):
        """Relative error of the grouped per-task gradients against the loop's (dropout off)."""
        self.model.eval()
        try:
            self.attach()
            self.grads("grouped")
            g = self._grouped.buffer.float().clone()
            self._grouped.zero_grad()
            self.detach()
            self.grads("loop")
            ref = self.loop.buffer.float().clone()
            self.loop.zero_grad()
        finally:
            self.model.train()
            self.detach()
        return float((g - ref).norm() / ref.norm().clamp_min(1e-30))

    def timed(self, method):
        if method == "grouped":
            self.attach()
        _sync(self.device)
        c0, t0 = time.process_time(), time.perf_counter()
        self.step(method)
        _sync(self.device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        self.detach()
        return dt, dc

    def peak(self, method):
        """Peak memory (MiB) of one step above what existed before it (and before the grouped
        OrthoLoRA and its buffer were built)."""
        import gc

        gc.collect()
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            if method == "grouped":
                self.attach()
            self.step(method)
            _sync(self.device)
            self.detach()
            return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        now = _malloc_in_use()
        if now is None:
            return float("nan")
        tracker = _peak_tracker(now)
        tracker.peak = base = now()
        with tracker:
            if method == "grouped":
                self.attach()
            self.step(method)
        self.detach()
        return (tracker.peak - base) / 2 ** 20


def run_t(args, model, num_tasks, device, token_ids):
    """Rows of the table for one T (all methods interleaved)."""
    b = Bench(args, model, num_tasks, device, token_ids)
    err = b.check()
    tol = 1e-3 if args.dtype == "float32" else 5e-2
    print(f"  T={num_tasks}: grouped vs loop per-task gradients, relative error {err:.2e}", file=sys.stderr,
          flush=True)
    if not err <= tol:
        raise SystemExit(f"T={num_tasks}: grouped per-task gradients differ from the loop's (relative error {err:.2e})")
    for _ in range(args.warmup):
        for m in args.methods:
            b.timed(m)
    times = {m: [] for m in args.methods}
    cpu = {m: [] for m in args.methods}
    for rep in range(args.repeat):
        order = args.methods[rep % len(args.methods):] + args.methods[:rep % len(args.methods)]
        for m in order:
            dt, dc = b.timed(m)
            times[m].append(dt)
            cpu[m].append(dc)
    peaks = {m: (float("nan") if args.no_mem else b.peak(m)) for m in args.methods}
    b.loop.remove()
    rows = []
    for m in args.methods:
        r = {"T": num_tasks, "method": m, "median_ms": 1e3 * statistics.median(times[m]),
             "cpu_ms": 1e3 * statistics.median(cpu[m]), "peak_mib": peaks[m], "grad_rel_err": err}
        if "joint" in times:
            r["x_joint"] = statistics.median(a / j for a, j in zip(times[m], times["joint"]))
            r["cpu_x_joint"] = statistics.median(a / j for a, j in zip(cpu[m], cpu["joint"]))
            pj = peaks["joint"]
            r["mem_x_joint"] = peaks[m] / pj if pj and pj > 0 else float("nan")
        rows.append(r)
    return rows


def _word_tokenizer(vocab: int):
    """A tokenizer whose ids are 0..vocab-1 (TRL needs one; the documents are token ids)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t2")


def run_sft(args, num_tasks, device, dtype):
    """``sft-joint`` vs ``sft-grouped``: one optimizer step each through the TRL trainer."""
    import tempfile

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from ortholora_kernels.integrations import OrthoLoRASFTTrainer

    rows, dpr = args.rows, args.docs_per_row
    doc_len = args.seq_len // dpr
    vocab = args.vocab_size or (LLAMA_QUICK if args.quick else LLAMA3_8B)["vocab_size"]
    g = torch.Generator().manual_seed(num_tasks)
    ndocs = rows * dpr
    docs = torch.randint(3, vocab, (ndocs, doc_len), generator=g).tolist()
    task = torch.arange(num_tasks).repeat_interleave(-(-ndocs // num_tasks))[:ndocs]
    task = task[torch.randperm(ndocs, generator=g)].tolist()
    ds = Dataset.from_dict({"input_ids": docs, "task": task})
    tok = _word_tokenizer(vocab)
    out = tempfile.mkdtemp(prefix="bench_sft_")
    cfg = SFTConfig(output_dir=out, report_to="none", use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16,
                    per_device_train_batch_size=rows, max_length=args.seq_len, packing=True, packing_strategy="bfd",
                    gradient_checkpointing=False, learning_rate=1e-5, max_grad_norm=1.0, save_strategy="no",
                    dataloader_num_workers=0, disable_tqdm=True, train_sampling_strategy="sequential",
                    log_level="error")
    trainers = {}
    for method in ("sft-joint", "sft-grouped"):
        model, _ = build_model(args, device, dtype)
        if method == "sft-joint":
            trainers[method] = SFTTrainer(model=model, args=cfg, train_dataset=ds.remove_columns("task"),
                                          processing_class=tok)
        else:
            trainers[method] = OrthoLoRASFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                                                   num_tasks=num_tasks, task_names=[str(i) for i in range(num_tasks)],
                                                   ortho_granularity="ab", ortho_seed=0, ortho_backend=args.backend)
    batches = {}
    for method, tr in trainers.items():
        tr.create_optimizer_and_scheduler(num_training_steps=1000)
        tr.current_gradient_accumulation_steps = 1   # set by train(): one micro-batch per step here
        batches[method] = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
        tr.model.train()
    b = batches["sft-joint"]
    assert tuple(b["input_ids"].shape) == (1, rows * args.seq_len), tuple(b["input_ids"].shape)

    def step(method):
        tr = trainers[method]
        _sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        tr.training_step(tr.model, dict(batches[method]))
        torch.nn.utils.clip_grad_norm_([p for p in tr.model.parameters() if p.requires_grad], 1.0)
        tr.optimizer.step()
        tr.lr_scheduler.step()
        tr.model.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    methods = list(trainers)
    for _ in range(args.warmup):
        for m in methods:
            step(m)
    times = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    for rep in range(args.repeat):
        for m in methods[rep % 2:] + methods[:rep % 2]:
            dt, dc = step(m)
            times[m].append(dt)
            cpu[m].append(dc)
    ortho = trainers["sft-grouped"].ortho
    ortho.remove()
    same = torch.equal(batches["sft-joint"]["input_ids"], batches["sft-grouped"]["input_ids"])
    res = []
    for m in methods:
        res.append({"T": num_tasks, "method": m, "median_ms": 1e3 * statistics.median(times[m]),
                    "x_joint": statistics.median(a / j for a, j in zip(times[m], times["sft-joint"])),
                    "cpu_ms": 1e3 * statistics.median(cpu[m]),
                    "cpu_x_joint": statistics.median(a / j for a, j in zip(cpu[m], cpu["sft-joint"])),
                    "projections": ortho.num_steps if m == "sft-grouped" else 0, "same_batch": same})
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU: a reduced Llama (2 layers, hidden 256), fp32")
    ap.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8], help="numbers of tasks T")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--device", default=None, help="default: cpu with --quick, else cuda")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: float32 with --quick, else bfloat16")
    ap.add_argument("--rows", type=int, default=8, help="packed sequences per step (a multiple of every T)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 256 quick, 1024)")
    ap.add_argument("--docs-per-row", type=int, default=4, help="documents per packed sequence")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--hidden-size", type=int, default=None, help="override the config's hidden size")
    ap.add_argument("--intermediate-size", type=int, default=None, help="override the MLP width")
    ap.add_argument("--num-hidden-layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary size")
    ap.add_argument("--backend", default=None, help="projection backend (default: automatic)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=None, help="timed rounds (default: 5 quick, 10)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-mem", action="store_true", help="skip the peak-memory steps")
    ap.add_argument("--per-row-ids", action="store_true",
                    help="grouped: one task per sequence ([batch] ids) even when per-token ids are supported")
    ap.add_argument("--out", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--sft", action="store_true",
                    help="time one optimizer step through TRL's SFTTrainer (joint) vs OrthoLoRASFTTrainer (grouped)")
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.quick else "cuda")
    args.dtype = args.dtype or ("float32" if args.quick else "bfloat16")
    args.seq_len = args.seq_len or (256 if args.quick else 1024)
    args.repeat = args.repeat or (5 if args.quick else 10)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --quick (CPU) or --device cpu")
    if args.sft:
        return main_sft(args, device)
    if args.per_row_ids:
        token_ids, how = False, "--per-row-ids"
    else:
        token_ids, how = supports_token_ids()
    layout = ("packed sequences, documents of all tasks mixed, per-token task ids [batch, seq] (" + how + ")"
              if token_ids else
              f"FALLBACK: one task per sequence, [batch] task ids ({how}); joint still uses the mixed packing")
    print(f"grouped collection: {layout}", flush=True)
    model, cfg = build_model(args, device, getattr(torch, args.dtype))
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"model: Llama {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads}, intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}, "
          f"{n_all / 1e6:.1f}M parameters; LoRA r={args.rank} on {','.join(TARGETS)}: {n_lora / 1e6:.2f}M trainable; "
          f"{args.dtype} on {device}, {torch.get_num_threads()} threads", flush=True)
    print(f"batch: {args.rows} sequences x {args.seq_len} tokens, {args.docs_per_row} documents each "
          "(block-diagonal causal attention)", flush=True)
    rows = []
    for t in args.tasks:
        rows.extend(run_t(args, model, t, device, token_ids))
    hdr = f"{'T':>2} {'method':8} {'median ms':>10} {'x joint':>8} {'cpu ms':>9} {'x joint':>8} {'peak MiB':>9} {'x joint':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['T']:>2} {r['method']:8} {r['median_ms']:>10.1f} {r.get('x_joint', float('nan')):>8.3f} "
              f"{r['cpu_ms']:>9.1f} {r.get('cpu_x_joint', float('nan')):>8.3f} {r['peak_mib']:>9.1f} "
              f"{r.get('mem_x_joint', float('nan')):>8.3f}")
    print("x joint (time) = median over rounds of the per-round ratio; memory: "
          + ("cuda max_memory_allocated delta" if device.type == "cuda" else "cpu malloc in-use peak (mallinfo2)"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "grouped_layout": layout, "args": vars(args)}, f, indent=1)
    big = max(args.tasks)
    by = {r["method"]: r for r in rows if r["T"] == big}
    if "joint" in by and "grouped" in by and "loop" in by:
        print(f"grouped/joint = {by['grouped']['x_joint']:.2f}, loop/joint = {by['loop']['x_joint']:.2f}")


def main_sft(args, device):
    """``--sft``: the trainer path (see the module docstring)."""
    dtype = getattr(torch, args.dtype)
    print(f"sft: TRL trainers, {args.rows} sequences x {args.seq_len} tokens packed padding-free ('bfd'), "
          f"{args.docs_per_row} documents each; {args.dtype} on {device}, {torch.get_num_threads()} threads",
          flush=True)
    rows = []
    for t in args.tasks:
        rows.extend(run_sft(args, t, device, dtype))
    print(f"{'T':>2} {'method':12} {'median ms':>10} {'x joint':>8} {'cpu ms':>9} {'x joint':>8}")
    for r in rows:
        print(f"{r['T']:>2} {r['method']:12} {r['median_ms']:>10.1f} {r['x_joint']:>8.3f} {r['cpu_ms']:>9.1f} "
              f"{r['cpu_x_joint']:>8.3f}")
    print("x joint = median over rounds of the per-round ratio (wall; cpu: process time)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "args": vars(args)}, f, indent=1)
    big = max(args.tasks)
    by = {r["method"]: r for r in rows if r["T"] == big}
    print(f"sft grouped/joint = {by['sft-grouped']['x_joint']:.2f}")
    return rows


if __name__ == "__main__":
    main()
