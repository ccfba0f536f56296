"""LoRA training with transformers + peft; the same code on CPU and on GPUs.

* Loss only on assistant tokens (the prompt is masked with -100, see ``finetune.data``).
* Checkpoints every ``training.save_steps`` under ``<run_dir>/checkpoints``; running the
  same job again with the same run folder resumes from the last complete checkpoint
  (adapter weights, optimizer, scheduler, RNG state and step counter).
* Per-step train loss and periodic validation loss go to ``<run_dir>/metrics.jsonl`` and to
  the caller's hooks (the worker forwards them to the job store and MLflow).
* Cancellation: a ``CANCEL`` file in the run folder (or ``hooks.should_cancel()``) stops
  training at the next step boundary; no adapter is written.
* At the end: ``<run_dir>/adapter`` (a PEFT adapter folder vLLM and peft load) with
  ``keel-adapter.json`` (spec hash, data hash, base model, metrics).

Multi-GPU data parallelism uses the same entry point (the HF Trainer picks up the
distributed environment; only rank 0 writes the adapter and metadata)::

    torchrun --nproc_per_node 4 -m finetune.train finetune/jobs/veltmar-fact.yaml --run-dir runs/x
    accelerate launch --num_processes 4 -m finetune.train finetune/jobs/veltmar-fact.yaml --run-dir runs/x
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune.data import IGNORE_INDEX, DataReport, check_dataset, encode_example, token_counter
from finetune.errors import InvalidJobSpec, TrainingFailed
from finetune.spec import JobSpec, load_spec, resolve_base_model

log = logging.getLogger("keel.finetune.train")

CANCEL_FILE = "CANCEL"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
METADATA_FILE = "keel-adapter.json"


@dataclass
class TrainHooks:
    """What the caller wants to hear about; every hook is optional and must be quick."""

    on_start: Callable[[dict[str, Any]], None] | None = None  # data report, max_steps, resumed_from
    on_log: Callable[[int, dict[str, float]], None] | None = None  # step, {"loss": ..} or {"eval_loss": ..}
    on_progress: Callable[[int, int], None] | None = None  # step, max_steps
    should_cancel: Callable[[], bool] | None = None


@dataclass
class TrainResult:
    status: str  # "succeeded" | "cancelled"
    run_dir: Path
    adapter_dir: Path | None
    global_step: int
    max_steps: int
    resumed_from: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    data_report: DataReport | None = None
    spec_hash: str = ""
    base_model: str = ""


def resolve_device(requested: str | None) -> str:
    import torch

    wanted = (requested or "auto").lower()
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidJobSpec(f"training.device {requested!r} was asked for but CUDA is not available",
                             param="training.device")
    return wanted


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder that was completely written (has trainer_state.json)."""
    ckpts = []
    for p in (run_dir / CHECKPOINT_DIR).glob("checkpoint-*"):
        suffix = p.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and (p / "trainer_state.json").is_file():
            ckpts.append((int(suffix), p))
    return max(ckpts)[1] if ckpts else None


class _PadCollator:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = width - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [self.pad_id] * pad)
            batch["attention_mask"].append(f["attention_mask"] + [0] * pad)
            batch["labels"].append(f["labels"] + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def _make_callback(run_dir: Path, hooks: TrainHooks, state: dict[str, Any]):
    from transformers import TrainerCallback

    metrics_path = run_dir / "metrics.jsonl"
    cancel_path = run_dir / CANCEL_FILE

    class KeelCallback(TrainerCallback):
        def on_train_begin(self, args, tstate, control, **kw):
            log.info("training loop starts at step %d of %d", tstate.global_step, tstate.max_steps)
            state["max_steps"] = tstate.max_steps
            state["last_step_t"] = time.perf_counter()

        def on_step_end(self, args, tstate, control, **kw):
            now = time.perf_counter()
            state["step_times"].append(now - state["last_step_t"])
            state["last_step_t"] = now
            if hooks.on_progress:
                hooks.on_progress(tstate.global_step, tstate.max_steps)
            if cancel_path.exists() or (hooks.should_cancel and hooks.should_cancel()):
                state["cancelled"] = True
                control.should_training_stop = True
                control.should_save = False
                control.should_evaluate = False
                log.info("cancel requested: stopping at step %d", tstate.global_step)
            return control

        def on_evaluate(self, args, tstate, control, **kw):
            # The eval pass counts into the next step's wall time; do not blame the step for it.
            state["last_step_t"] = time.perf_counter()

        def on_log(self, args, tstate, control, logs=None, **kw):
            if not logs:
                return
            wanted = {k: float(v) for k, v in logs.items()
                      if k in ("loss", "eval_loss", "learning_rate", "grad_norm") and v is not None}
            if not wanted:
                return
            step = tstate.global_step
            if not tstate.is_world_process_zero:
                return
            with metrics_path.open("a") as f:
                f.write(json.dumps({"step": step, "epoch": tstate.epoch, "time": time.time(), **wanted}) + "\n")
            parts = " ".join(f"{k}={v:.4g}" for k, v in wanted.items())
            log.info("step %d/%s %s", step, tstate.max_steps or "-", parts)
            if hooks.on_log:
                hooks.on_log(step, wanted)

    return KeelCallback()


def run_training(
    spec: JobSpec, run_dir: Path, *, models_dir: Path, device: str | None = None, hooks: TrainHooks | None = None,
) -> TrainResult:
    """Validate the data, then train (or resume) the LoRA adapter described by ``spec`` into ``run_dir``."""
    hooks = hooks or TrainHooks()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    base = resolve_base_model(spec, models_dir)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, Trainer, TrainingArguments
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_warning()
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    report = check_dataset(spec, token_counter(tokenizer))
    log.info("%s (data hash %s)", report.summary(), report.data_hash[:12])
    train_rows = [encode_example(tokenizer, e.messages) for e in report.train]
    val_rows = [encode_example(tokenizer, e.messages) for e in report.validation]

    t = spec.training
    dev = resolve_device(t.device or device)
    on_gpu = dev.startswith("cuda")
    if on_gpu and ":" in dev:
        torch.cuda.set_device(int(dev.split(":", 1)[1]))
    bf16 = on_gpu and t.dtype in ("auto", "bfloat16") and torch.cuda.is_bf16_supported()
    fp16 = on_gpu and t.dtype == "float16"
    if not on_gpu and t.dtype in ("bfloat16", "float16"):
        log.warning("training.dtype %s ignored on CPU: training in float32", t.dtype)

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
        target_modules=list(spec.lora.target_modules), bias=spec.lora.bias,
    )
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()

    eval_steps = t.eval_steps or t.save_steps
    args = TrainingArguments(
        output_dir=str(run_dir / CHECKPOINT_DIR),
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.learning_rate,
        num_train_epochs=t.epochs or 1.0, max_steps=t.max_steps or -1,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        logging_strategy="steps", logging_steps=t.logging_steps,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        eval_strategy="steps" if val_rows else "no", eval_steps=eval_steps if val_rows else None,
        seed=t.seed, data_seed=t.seed, bf16=bf16, fp16=fp16, use_cpu=not on_gpu,
        report_to=[], disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
        save_only_model=False,
    )
    state: dict[str, Any] = {"step_times": [], "cancelled": False, "max_steps": 0}
    trainer = Trainer(
        model=model, args=args, train_dataset=train_rows, eval_dataset=val_rows or None,
        data_collator=_PadCollator(tokenizer.pad_token_id), callbacks=[_make_callback(run_dir, hooks, state)],
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; the job log has them
    resume = last_checkpoint(run_dir)
    if (run_dir / CANCEL_FILE).exists():
        (run_dir / CANCEL_FILE).unlink()  # a stale flag from an earlier cancelled attempt
    log.info("training %s on %s: base %s, %d/%d trainable params (%.2f%%), %d train / %d val examples%s",
             spec.name, dev, base, trainable, total, 100 * trainable / total, len(train_rows), len(val_rows),
             f", resuming from {resume.name}" if resume else "")
    if hooks.on_start:
        hooks.on_start({"data": report.to_dict(), "resumed_from": str(resume) if resume else None,
                        "device": dev, "trainable_params": trainable})

    metrics: dict[str, float] = {}
    if val_rows and resume is None:
        # Validation loss of the untouched base model, logged as step 0 (through the callback).
        metrics["eval_loss_initial"] = trainer.evaluate()["eval_loss"]
    t0 = time.perf_counter()
    try:
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except (KeyboardInterrupt, InvalidJobSpec):
        raise
    except Exception as exc:
        raise TrainingFailed(f"training {spec.name!r} failed at step {trainer.state.global_step}: "
                             f"{type(exc).__name__}: {exc}") from exc
    wall = time.perf_counter() - t0
    step = trainer.state.global_step
    result = TrainResult(
        status="cancelled" if state["cancelled"] else "succeeded", run_dir=run_dir, adapter_dir=None,
        global_step=step, max_steps=trainer.state.max_steps, resumed_from=str(resume) if resume else None,
        data_report=report, spec_hash=spec.spec_hash(), base_model=str(base),
    )
    if state["cancelled"]:
        log.info("cancelled at step %d/%d", step, trainer.state.max_steps)
        return result

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    last_eval_step = max((h["step"] for h in trainer.state.log_history if "eval_loss" in h), default=-1)
    if val_rows and last_eval_step != step:
        evals.append(trainer.evaluate()["eval_loss"])
    times = state["step_times"][1:] or state["step_times"]  # the first step pays for warm-up
    mean_tokens = report.token_stats.get("mean", 0.0)
    tokens_per_step = mean_tokens * t.batch_size * t.grad_accum
    metrics.update({
        "train_loss_first": losses[0] if losses else math.nan,
        "train_loss_last": losses[-1] if losses else math.nan,
        "train_loss_mean": float(out.training_loss),
        "global_step": float(step),
        "train_runtime_s": wall,
        "s_per_step": statistics.median(times) if times else math.nan,
        "train_tokens_per_s": tokens_per_step / statistics.median(times) if times else math.nan,
        "trainable_params": float(trainable),
    })
    if evals:
        metrics["eval_loss_final"] = evals[-1]
        metrics.setdefault("eval_loss_initial", evals[0])
    result.metrics = metrics

    if trainer.is_world_process_zero():
        adapter_dir = run_dir / ADAPTER_DIR
        model.save_pretrained(str(adapter_dir))
        meta = {
            "format": 1, "job": spec.name, "registered_model": spec.model_name, "spec_hash": spec.spec_hash(),
            "data_hash": report.data_hash, "base_model": str(base), "base_model_name": spec.base_model,
            "lora": spec.lora.model_dump(), "training": spec.training.model_dump(), "metrics": metrics,
            "train_examples": report.train_examples, "validation_examples": report.validation_examples,
            "device": dev, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "resumed_from": result.resumed_from,
        }
        (adapter_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2))
        result.adapter_dir = adapter_dir
        log.info("adapter saved to %s (train loss %.4g -> %.4g)", adapter_dir,
                 metrics["train_loss_first"], metrics["train_loss_last"])
    return result


def main(argv: list[str] | None = None) -> int:
    """Train one spec without the job store (also the torchrun/accelerate entry point)."""
    p = argparse.ArgumentParser(prog="python -m finetune.train", description=__doc__.split("\n")[0])
    p.add_argument("spec", type=Path)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("KEEL_HOME", ".keel")) / "models")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_training(load_spec(a.spec), a.run_dir, models_dir=a.models_dir, device=a.device)
    print(json.dumps({"status": result.status, "adapter": str(result.adapter_dir), "metrics": result.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
