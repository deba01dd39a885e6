"""The training loop shared by every method.

Each step takes one batch from every task (each task cycles through its own data), runs
one forward pass over the concatenated multi-task batch, and hands the per-task mean
losses to the method, which writes ``.grad`` (joint: sum; ortho: per-task gradients ->
projection); then AdamW and a linear schedule with warm-up (restarted for every phase a
method declares: LoRI-D, LoRI-S, each phase with its own learning-rate scale and schedule;
the unit's step count is the sum of the phases). Methods with ``separate_tasks`` (single;
lori in merge and continual mode) run this loop once per task. Evaluation of task t runs inside the method's
``eval_context`` (MTL-LoRA: routed through task t's adapter). Each unit's trainable
parameter counts (adapter, heads) are summed into results.json's and config.json's
``params``.

Checkpoints (``checkpoint.pt``, atomic) hold the trainable weights, optimizer, scheduler,
python/numpy/torch RNG states, the data-order state, the method's state (projection order
generator) and the evaluations so far; ``resume=True`` continues from it and ends with
exactly the metrics of an uninterrupted run (on CPU).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from . import checkpoint as ckpt
from .data import MultiTaskSampler, encode, load_tasks, pad_batch, write_synthetic_suite
from .methods import METHOD_OPTIONS, get_method
from .metrics import split_metrics, task_score
from .model import check_model_name, is_tiny, load_encoder, load_tokenizer
from .report import CONFLICTS, ConflictLog, write_results, write_run_plots
from .tasks import parse_tasks


@dataclass
class TrainConfig:
    """Every option of a training run (the CLI's ``train`` flags; recorded in config.json)."""
    tasks: list = field(default_factory=lambda: ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"])
    method: str = "ortho"
    out: str = "runs/glue"
    data_dir: str | None = None          # None: hub (nyu-mll/glue)
    synthetic: bool = False               # write the synthetic suite into <out>/data and use it
    model: str = "roberta-base"
    tiny_hidden: int = 32
    tiny_layers: int = 2
    pooling: str = "cls"                  # head input: first token (RoBERTa) or mean
    max_length: int = 128
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    lora_target_modules: list = field(default_factory=lambda: ["query", "value"])
    batch_size: int = 16                  # per task and step
    eval_batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_steps: int = 2000
    epochs: float | None = None           # overrides max_steps: epochs of the largest task
    eval_every: int = 500
    save_every: int = 500
    log_every: int = 50                   # conflict-log flush period (steps)
    seed: int = 0
    granularity: str | None = None        # ortho: global|ab|layer|matrix (default ab)
    collect: str | None = None            # ortho: grouped|loop (default grouped)
    backend: str | None = None            # ortho: projection backend (default automatic)
    log_conflicts: bool = False           # joint: collect per-task gradients to log their conflicts
    projection: str | None = None         # mtl-lora, lori (joint): Ortho-LoRA on top: none|global|ab|layer|matrix
    aggregator: str | None = None         # ortho / --projection: pcgrad (default), upgrad, cagrad, ...
    aggregator_options: str | None = None  # its options, "c=0.5,iters=8"
    aggregator_ema: float | None = None   # EMA-smoothed conflict detection (beta)
    mtl_num_b: int | None = None          # mtl-lora: number of shared up-projections B_k (default 3)
    mtl_temperature: float | None = None  # mtl-lora: softmax temperature of the B mixture (default 0.1)
    mtl_diagonal: bool = False            # mtl-lora: diagonal task transforms Lambda_t
    lori_sparsity: float | None = None    # lori: fraction of B entries masked out in LoRI-S (default 0.9)
    lori_mode: str | None = None          # lori: merge (per-task adapters, merged) | continual | joint
    lori_shared_a: bool = False           # lori merge: one frozen A for every task (variant; default: one A per task)
    lori_s_steps: int | None = None       # lori: LoRI-S steps (default: as many as LoRI-D; 0: LoRI-D only)
    lori_s_lr: float | None = None        # lori: LoRI-S learning rate (default 10 x lr)
    lori_s_weight_decay: float | None = None  # lori: LoRI-S weight decay (default 0)
    lori_s_schedule: str | None = None    # lori: LoRI-S schedule: constant (default) | linear
    lori_merge_weights_d: list | None = None  # lori merge: LoRI-D merge weights (default: the authors' rule)
    lori_merge_weights_s: list | None = None  # lori merge: LoRI-S merge weights (default: the authors' rule)
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    resume: bool = False
    stop_after_steps: int | None = None   # testing: stop (as if killed) after this global step
    progress: bool = True
    plots: bool = True
    cache_dir: str | None = None
    threads: int | None = None            # torch intra-op threads (None: 1 for tiny-roberta, else torch's)

    def to_dict(self):
        """The configuration as a plain dict."""
        return dataclasses.asdict(self)


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TrainError(ValueError):
    """A user-facing training problem (bad option combination...)."""


def validate(cfg: TrainConfig):
    """Check option combinations; returns (method class, task specs)."""
    tasks = parse_tasks(cfg.tasks)
    check_model_name(cfg.model)
    try:
        method_cls = get_method(cfg.method)
    except ValueError as e:
        raise TrainError(str(e)) from None
    for opt in METHOD_OPTIONS:
        if getattr(cfg, opt) is not None and getattr(cfg, opt) is not False and opt not in method_cls.options:
            flag = "--" + opt.replace("_", "-")
            raise TrainError(f"{flag} applies only to methods that take it (not --method {cfg.method})")
    try:
        method_cls.check_config(cfg)
        if "aggregator" in method_cls.options:
            from .methods import check_aggregator
            check_aggregator(cfg)
    except ValueError as e:
        raise TrainError(str(e)) from None
    for opt, default in method_cls.defaults.items():
        if getattr(cfg, opt) is None:
            setattr(cfg, opt, default)
    if "log_conflicts" in method_cls.options and cfg.granularity is not None and not cfg.log_conflicts:
        raise TrainError(f"--granularity with --method {cfg.method} needs --log-conflicts")
    if cfg.granularity is not None and cfg.granularity not in ("global", "ab", "layer", "matrix"):
        raise TrainError(f"--granularity must be global, ab, layer or matrix, not {cfg.granularity!r}")
    if cfg.collect is not None and cfg.collect not in ("grouped", "loop"):
        raise TrainError(f"--collect must be grouped or loop, not {cfg.collect!r}")
    # resolved defaults of the method-specific options (recorded in config.json)
    for opt, default in (("granularity", "ab"), ("collect", "grouped")):
        if opt in method_cls.options and getattr(cfg, opt) is None and (
                "log_conflicts" not in method_cls.options or cfg.log_conflicts) and (
                "projection" not in method_cls.options or cfg.projection not in (None, "none")):
            setattr(cfg, opt, default)
    if "backend" in method_cls.options:
        from .. import backends

        try:
            backends.select(cfg.backend, _device())
        except (ValueError, RuntimeError) as e:
            raise TrainError(f"--backend: {e}") from None
    for name in ("max_train_samples", "max_eval_samples", "threads"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("batch_size", "eval_batch_size", "max_length", "lora_r", "eval_every", "save_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.max_steps < 1 and cfg.epochs is None:
        raise TrainError("--max-steps must be >= 1")
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise TrainError("--epochs must be > 0")
    for name in ("lr", "weight_decay"):
        if not getattr(cfg, name) >= 0:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 0")
    if is_tiny(cfg.model) and (cfg.tiny_hidden < 2 or cfg.tiny_hidden % 2 or cfg.tiny_layers < 1):
        raise TrainError("--tiny-hidden must be an even number >= 2 (tiny-roberta has 2 attention heads) "
                         "and --tiny-layers >= 1")
    if not 0 <= cfg.warmup_ratio < 1:
        raise TrainError("--warmup-ratio must be in [0, 1)")
    if cfg.synthetic and cfg.data_dir:
        raise TrainError("--synthetic and --data-dir are exclusive")
    if cfg.synthetic:
        from .data import SYNTHETIC_TASKS

        bad = [t.name for t in tasks if t.name not in SYNTHETIC_TASKS]
        if bad:
            raise TrainError(f"--synthetic: no synthetic version of {', '.join(bad)} "
                             f"(synthetic tasks: {', '.join(SYNTHETIC_TASKS)})")
    if len(tasks) < 2 and not method_cls.separate_tasks:
        pass  # one task is allowed (a joint run on one task is single-task training)
    return method_cls, tasks


# ----------------------------------------------------------------------------- batches

class Batcher:
    """One batch of every task per step (seeded per-task order), concatenated and padded."""
    def __init__(self, encoded, batch_size, seed, pad_id):
        self.encoded = encoded
        self.pad_id = pad_id
        self.sampler = MultiTaskSampler([len(e) for e in encoded], batch_size, seed)

    def next(self, device):
        """``(input_ids, attention_mask, task_slices, labels per task, task_ids on the CPU)``."""
        seqs, labels, slices, tids = [], [], [], []
        for t, enc in enumerate(self.encoded):
            idx = self.sampler.next_indices(t)
            slices.append((len(seqs), len(seqs) + len(idx)))
            seqs.extend(enc.input_ids[i] for i in idx)
            labels.append(enc.labels[idx].to(device))
            tids.extend([t] * len(idx))
        ids, mask = pad_batch(seqs, self.pad_id)
        # task ids stay on the CPU: the grouped collector reads them without a device sync
        return ids.to(device), mask.to(device), slices, labels, torch.tensor(tids)


def evaluate_tasks(model, method, datas, eval_enc, batch_size, pad_id, device, step, evals, **extra):
    """Evaluate every task (split by split) at ``step``; append to ``evals``. Each task's
    forward runs inside ``method.eval_context(model, task_index)``."""
    for ti, (d, encs) in enumerate(zip(datas, eval_enc)):
        metrics = {}
        for suffix, enc in encs.items():
            with method.eval_context(model, ti):
                p, y = evaluate(model, ti, d.task, enc, batch_size, pad_id, device)
            metrics.update({k + suffix: v for k, v in split_metrics(d.task, p, y).items()})
        evals.append({"step": step, "task": d.task.name, "metrics": metrics,
                      "score": task_score(d.task, metrics), **extra})


@torch.no_grad()
def evaluate(model, task_index, task, enc, batch_size, pad_id, device):
    """Predictions and labels of one evaluation split of ``task`` (numpy arrays, dataset order)."""
    model.eval()
    preds = []
    order = sorted(range(len(enc)), key=lambda i: len(enc.input_ids[i]))  # length-sorted: less padding
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        ids, mask = pad_batch([enc.input_ids[i] for i in idx], pad_id)
        h = model.features(ids.to(device), mask.to(device))
        out = model.heads[task.name](h, mask.to(device))
        p = out.squeeze(-1) if task.is_regression else out.argmax(-1)
        preds.append(p.float().cpu() if task.is_regression else p.cpu())
    model.train()
    pred = torch.empty(len(enc), dtype=preds[0].dtype)
    pred[torch.tensor(order)] = torch.cat(preds)
    return pred.numpy(), enc.labels.numpy()


# ----------------------------------------------------------------------------- one run unit

def _phase(p) -> dict:
    """A phase of ``Method.schedule_phases``: a step count, or a dict with ``steps`` and
    optionally ``lr_scale`` (times --lr, default 1) and ``schedule`` ("linear": warm-up then
    linear decay, the default; "constant")."""
    if isinstance(p, dict):
        return {"steps": int(p["steps"]), "lr_scale": float(p.get("lr_scale", 1.0)),
                "schedule": p.get("schedule", "linear")}
    return {"steps": int(p), "lr_scale": 1.0, "schedule": "linear"}


def _linear_schedule(optimizer, warmup_ratio, phases):
    """Per phase (``phases``: step counts or :func:`_phase` dicts): linear warm-up then linear
    decay, or a constant rate, times the phase's ``lr_scale``; restarted at each phase."""
    phases = [_phase(p) for p in phases]

    def g(step, warmup, total):
        if step < warmup:
            return (step + 1) / max(1, warmup) if warmup else 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    def f(step):
        start = 0
        for i, ph in enumerate(phases):
            n = ph["steps"]
            if step < start + n or i == len(phases) - 1:
                if ph["schedule"] == "constant":
                    return ph["lr_scale"]
                return ph["lr_scale"] * g(step - start, int(round(warmup_ratio * n)), n)
            start += n
    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def _num_steps(cfg, datas):
    if cfg.epochs is None:
        return cfg.max_steps
    biggest = max(len(d.train) for d in datas)
    return max(1, math.ceil(cfg.epochs * biggest / cfg.batch_size))


class Stopped(Exception):
    """Raised after the checkpoint of ``--stop-after-steps`` (a simulated interruption)."""
    pass


def _run_unit(cfg, method_cls, tasks, datas, tokenizer, unit, state, out_dir, device, evals, log, unit_params):
    """Train one model on ``tasks`` (all of them, or one for ``single``)."""
    total = _num_steps(cfg, datas)
    ckpt.seed_everything(cfg.seed)
    method = method_cls(cfg, tasks)
    encoder = load_encoder(cfg.model, tokenizer, cfg.max_length, cfg.seed, cfg.tiny_hidden, cfg.tiny_layers)
    model = method.build_model(encoder, tasks).to(device)
    model.train()
    method.setup(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    phases = method.schedule_phases(total)
    total = sum(_phase(p)["steps"] for p in phases)   # a method may add phases (LoRI-S: its own budget)
    scheduler = _linear_schedule(optimizer, cfg.warmup_ratio, phases)
    train_enc = [encode(tokenizer, d.train, d.task, cfg.max_length) for d in datas]
    eval_enc = [{s: encode(tokenizer, e, d.task, cfg.max_length) for s, e in d.evals.items()} for d in datas]
    pad_id = tokenizer.pad_token_id
    batcher = Batcher(train_enc, cfg.batch_size, cfg.seed, pad_id)
    start = 0
    if state is not None and state.get("unit") == unit and "model" in state:
        missing = model.load_state_dict(state["model"], strict=False)
        if missing.unexpected_keys:
            raise TrainError(f"checkpoint does not match the model: {missing.unexpected_keys[:3]}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        batcher.sampler.load_state_dict(state["sampler"])
        method.load_state_dict(state["method"])
        log.load_state_dict(state.get("conflicts", {}), state["global_step"])
        ckpt.set_rng_state(state["rng"])
        start = state["step"]

    def do_eval(step):
        evaluate_tasks(model, method, datas, eval_enc, cfg.eval_batch_size, pad_id, device, step, evals)

    def save(step):
        log.flush()
        ckpt.atomic_save({"unit": unit, "step": step, "global_step": step, "model": model.trainable_state_dict(),
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "sampler": batcher.sampler.state_dict(), "method": method.state_dict(),
                          "conflicts": log.state_dict(), "rng": ckpt.rng_state(), "evals": list(evals),
                          "unit_params": list(unit_params), "config": cfg.to_dict()}, os.path.join(out_dir, ckpt.LATEST))

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        desc = cfg.method if len(tasks) > 1 or not method_cls.is_separate(cfg) else f"{cfg.method}:{tasks[0].name}"
        bar = tqdm(total=total, initial=start, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True,
                   leave=True)
    loss_acc, loss_n, t0 = None, 0, time.perf_counter()
    for step in range(start + 1, total + 1):
        ids, mask, slices, labels, tids = batcher.next(device)
        outs = model(ids, mask, slices)
        losses = model.task_losses(outs, labels)
        stats = method.backward(model, losses, tids)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        log.append(step, stats)
        cur = torch.stack([x.detach() for x in losses]).sum()
        loss_acc = cur if loss_acc is None else loss_acc + cur
        loss_n += 1
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == total:   # one host sync per 10 steps for the display
                bar.set_postfix(loss=f"{float(loss_acc) / loss_n:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                loss_acc, loss_n = None, 0
        if step % cfg.eval_every == 0 or step == total:
            do_eval(step)
        method.step_end(model, step, optimizer)
        if step % cfg.save_every == 0 and step != total:
            save(step)
        if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps and step != total:
            save(step)
            if bar is not None:
                bar.close()
            raise Stopped(step)
    if bar is not None:
        bar.close()
    log.flush()
    unit_params.append(method.param_counts(model))
    method.teardown()
    log.segment_names = list(method.segment_names)
    name = "model_final.pt" if not method_cls.is_separate(cfg) else f"model_final_{tasks[0].name}.pt"
    ckpt.atomic_save({"tasks": [t.name for t in tasks], "state_dict": model.trainable_state_dict()},
                     os.path.join(out_dir, name))
    return model, total, time.perf_counter() - t0


def _resolved_config(cfg, method_cls) -> dict:
    """The configuration plus what it resolves to (backend, device, versions)."""
    import peft
    import transformers

    d = cfg.to_dict()
    res = {"device": str(_device()), "separate_tasks": method_cls.is_separate(cfg),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": peft.__version__}}
    projecting = "projection" not in method_cls.options or cfg.projection not in (None, "none")
    if "backend" in method_cls.options and projecting:
        from .. import backends

        res["backend"] = backends.select(cfg.backend, _device())
    d["resolved"] = res
    return d


def train(cfg: TrainConfig) -> dict:
    """Run the configured method; write the reports in ``cfg.out``; return results.json's dict."""
    method_cls, tasks = validate(cfg)
    out = cfg.out
    os.makedirs(out, exist_ok=True)
    if cfg.synthetic:
        cfg.data_dir = os.path.join(out, "data")
        if not os.path.isdir(cfg.data_dir):
            write_synthetic_suite(cfg.data_dir, seed=cfg.seed, tasks=[t.name for t in tasks])
    state = None
    ckpt_path = os.path.join(out, ckpt.LATEST)
    if cfg.resume:
        if not os.path.isfile(ckpt_path):
            raise TrainError(f"--resume: no checkpoint in {out}")
        try:
            state = ckpt.load(ckpt_path)
        except Exception as e:   # not a checkpoint of this program (checkpoints are written atomically)
            raise TrainError(f"--resume: cannot read {ckpt_path} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        saved = dict(state["config"])
        for k in ("resume", "stop_after_steps", "progress", "plots", "threads"):
            saved.pop(k, None)
        mine = {k: v for k, v in cfg.to_dict().items() if k in saved}
        diff = [k for k in saved if saved[k] != mine.get(k) and k not in ("out", "data_dir", "cache_dir")]
        if diff:
            raise TrainError(f"--resume: options differ from the checkpointed run: {', '.join(diff)}")
    else:
        for f in (ckpt_path, os.path.join(out, CONFLICTS), os.path.join(out, "cosine.json")):
            if os.path.exists(f):
                os.remove(f)
    ckpt.atomic_write_json(os.path.join(out, "config.json"), _resolved_config(cfg, method_cls))
    datas = load_tasks(tasks, cfg.data_dir, cfg.max_train_samples, cfg.max_eval_samples, cfg.seed, cfg.cache_dir)
    texts = []
    if is_tiny(cfg.model):
        for d in datas:
            texts.extend(d.train.text_a)
            texts.extend(d.train.text_b or [])
    tokenizer = load_tokenizer(cfg.model, out, texts)
    device = _device()
    threads = cfg.threads or (1 if is_tiny(cfg.model) else None)
    saved_threads = torch.get_num_threads()
    if threads:   # tiny models are launch-bound: extra threads only spin (and fight other jobs)
        torch.set_num_threads(threads)
    try:
        return _train_units(cfg, method_cls, tasks, datas, tokenizer, device, state, out, ckpt_path)
    finally:
        torch.set_num_threads(saved_threads)


def _sum_params(unit_params):
    """Trainable scalars over the run's units (separately trained adapters add up)."""
    out = {"adapter": sum(p["adapter"] for p in unit_params), "heads": sum(p["heads"] for p in unit_params)}
    out["total"] = out["adapter"] + out["heads"]
    out["units"] = len(unit_params)
    return out


def _train_units(cfg, method_cls, tasks, datas, tokenizer, device, state, out, ckpt_path):
    evals = list(state["evals"]) if state else []
    unit_params = list(state.get("unit_params", [])) if state else []
    log = ConflictLog(os.path.join(out, CONFLICTS), cfg.log_every)
    units = [[i] for i in range(len(tasks))] if method_cls.is_separate(cfg) else [list(range(len(tasks)))]
    first = state["unit"] if state else 0
    seconds = 0.0
    steps = 0
    try:
        for u, members in enumerate(units):
            if u < first:
                continue
            _, n, sec = _run_unit(cfg, method_cls, [tasks[i] for i in members], [datas[i] for i in members],
                                  tokenizer, u, state if u == first else None, out, device, evals, log,
                                  unit_params)
            seconds += sec
            steps += n
            if u + 1 < len(units):   # checkpoint the unit boundary
                ckpt.atomic_save({"unit": u + 1, "evals": list(evals), "config": cfg.to_dict(), "step": 0,
                                  "global_step": 0, "unit_params": list(unit_params)}, ckpt_path)
    except Stopped:
        write_results(out, cfg.to_dict(), evals, {"finished": False})
        raise
    cos = log.mean_cosine_matrix()
    if cos is not None:
        ckpt.atomic_write_json(os.path.join(out, "cosine.json"), {"tasks": [t.name for t in tasks],
                                                                   "segments": getattr(log, "segment_names", []),
                                                                   "mean_cosine": cos})
    extra = method_cls.post_train(cfg, tasks, datas, tokenizer, device, evals) or {}
    params = _sum_params(unit_params)
    res = write_results(out, cfg.to_dict(), evals, {"finished": True, "train_seconds": round(seconds, 2),
                                                    "params": params, **extra})
    conf = _resolved_config(cfg, method_cls)
    conf["resolved"]["params"] = params
    ckpt.atomic_write_json(os.path.join(out, "config.json"), conf)
    if cfg.plots:
        write_run_plots(out, res, cfg.to_dict())
    return res
