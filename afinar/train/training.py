"""Supervised fine-tuning with TRL's SFTTrainer, with our metrics, NaN guard and time-based checkpoints."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from afinar.core import atomic, checkpoints, distributed
from afinar.core.errors import UserError
from afinar.core.layout import OutputLayout
from afinar.core.models import unwrap_peft
from afinar.core.prompts import tokenize_example
from afinar.train.packing import Collator, common_prefix, first_label, pack_in_order, shared_prefix_mask


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, value: float):
        super().__init__(f"loss {value} at step {step}")
        self.step = step
        self.value = value


def triton_available() -> bool:
    """TRL 1.15's fused LM head needs Triton (a CUDA build); on CPU we compute the loss ourselves."""
    try:
        import torch
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def build_dataset(entries: list[dict], tokenizer, max_seq_length: int, packing: bool, open_rows: int = 1,
                  share_prefix: bool = False, rejected: bool = False):
    """(the rows as a Dataset, the leading tokens each packed row holds once: empty unless share_prefix).

    rejected (ORPO, packed rows with a shared prefix only): an entry's `rejected` answer rides in its row as a
    branch that shares the prompt (afinar.train.packing._add_rejected_branch).
    """
    from datasets import Dataset

    rows = [tokenize_example(tokenizer, entry, max_seq_length) for entry in entries]
    prefix = common_prefix(rows, max_seq_length) if packing and share_prefix else []
    if prefix and rejected:
        for row, entry in zip(rows, entries):
            if isinstance(entry.get("rejected"), str) and entry["rejected"].strip():
                wrong = tokenize_example(tokenizer, {**entry, "output": entry["rejected"]}, max_seq_length)
                start = first_label(row)
                if wrong["input_ids"][:start] == row["input_ids"][:start]:  # the same (untruncated) prompt
                    row["rejected_ids"] = wrong["input_ids"][start:]
    if packing:
        rows = pack_in_order(rows, max_seq_length, open_rows, prefix)
    return Dataset.from_list(rows), prefix


def response_only_loss(model, inputs: dict, num_items_in_batch=None, row_lengths: list[int] | None = None,
                       pair_ids=None, orpo_beta: float = 0.0):
    """Cross-entropy of the labelled (response) tokens, without logits for the prompt positions.

    Equal to the model's own loss (sum over labelled next tokens / their count, or / num_items_in_batch
    under gradient accumulation), but the 49k- or 128k-wide LM head only sees the positions that count.
    row_lengths (each row's real tokens, from the collator): with a frozen prefix attached (afinar.train.frozen_prefix),
    the frozen layers below the adapter run once per row instead of once per epoch.
    """
    import torch
    import torch.nn.functional as F

    from afinar.train import frozen_prefix
    from afinar.core.prompts import IGNORE_INDEX

    causal_lm = unwrap_peft(model)
    features = {k: v for k, v in inputs.items() if k != "labels"}
    prefix = frozen_prefix.of(causal_lm)
    if prefix is not None and row_lengths is not None:
        hidden = prefix.last_hidden_state(features, row_lengths)
    else:
        hidden = causal_lm.model(**features).last_hidden_state
    targets = inputs["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    if pair_ids is None or not orpo_beta:
        logits = causal_lm.lm_head(hidden[:, :-1][keep]).float()
        return F.cross_entropy(logits, targets[keep], reduction="sum") / count
    # ORPO (Hong et al., 2024): the SFT loss plus beta * -log sigmoid(log odds(chosen) - log odds(rejected)),
    # with each answer's mean token log-probability. The rejected answers' tokens are scored, never trained.
    pairs = pair_ids[:, :-1]
    scored = keep | (pairs < 0)
    wanted = torch.where(keep, targets, inputs["input_ids"][:, 1:])
    logits = causal_lm.lm_head(hidden[:, :-1][scored]).float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, wanted[scored].unsqueeze(-1)).squeeze(-1)
    sft = -token_logps[keep[scored]].sum() / count
    owner = pairs[scored]
    marked = owner != 0
    width = int(pairs.abs().max()) + 1
    row = torch.arange(pairs.shape[0], device=pairs.device)[:, None].expand_as(pairs)[scored][marked]
    slot = (row * width + owner[marked].abs()) * 2 + (owner[marked] < 0).long()  # [pair, chosen | rejected]
    sums = torch.zeros(pairs.shape[0] * width * 2, device=logits.device).index_add(0, slot, token_logps[marked])
    sizes = torch.zeros_like(sums).index_add(0, slot, torch.ones_like(token_logps[marked]))
    present = sizes.view(-1, 2).min(dim=1).values > 0
    mean = (sums / sizes.clamp(min=1)).view(-1, 2)[present]
    # log odds = log p - log(1 - p), with log(1 - p) = log(-expm1(log p)); mean log p < 0 always
    log_odds = mean - torch.log(-torch.expm1(mean.clamp(max=-1e-6)))
    ratio = -F.logsigmoid(log_odds[:, 0] - log_odds[:, 1]).mean() if len(mean) else sft * 0
    return sft + orpo_beta * ratio


def use_shared_prefix_mask(model, inputs: dict, shared_prefix: int) -> None:
    """Rows packed with a shared prefix (afinar.train.packing): the collator's segment_ids become the 4D mask,
    built for the model's attention (boolean for sdpa, additive for eager) and dtype. No-op for other rows."""
    segment_ids = inputs.pop("segment_ids", None)
    branch_ids = inputs.pop("branch_ids", None)
    if segment_ids is not None:
        causal_lm = unwrap_peft(model)
        inputs["attention_mask"] = shared_prefix_mask(segment_ids, shared_prefix,
                                                      causal_lm.config._attn_implementation, causal_lm.dtype,
                                                      branch_ids=branch_ids)


LOSS_IMPLS = ("auto", "response_only")


def uses_fused_head(loss_impl: str) -> bool:
    """loss_impl "auto" = TRL's Triton fused LM head where Triton runs (GPU), our response-only loss on CPU,
    where TRL's crashes; "response_only" = ours everywhere (full logits of the response positions)."""
    return loss_impl == "auto" and triton_available()


def _make_trainer_class(loss_impl: str = "auto"):
    import torch
    from transformers import Trainer
    from trl import SFTTrainer

    use_fused_head = uses_fused_head(loss_impl)

    class AfinarTrainer(SFTTrainer):
        """SFTTrainer that keeps our data order, counts real tokens and stops on a non-finite loss."""

        real_tokens = 0
        shared_prefix = 0  # afinar.train.packing: the leading tokens each packed row holds once
        kernel_fallback = None  # afinar.train.engine.kernel_fallback, until the first step has run
        loraplus_lr_ratio = 1.0  # LoRA+: lora_B's learning rate over lora_A's (1 = plain LoRA)
        orpo_beta = 0.0  # ORPO's weight on the odds ratio of chosen over rejected answers (0 = plain SFT)
        # On a GPU, checking each loss on the host would stall the queue once per step: the check is
        # accumulated on the device and read when the step is logged or saved (never after a bad save).
        first_bad_step = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            tokens = int(inputs.pop("real_tokens"))
            row_lengths = inputs.pop("row_lengths", None)
            pair_ids = inputs.pop("pair_ids", None)
            use_shared_prefix_mask(model, inputs, self.shared_prefix)
            if not model.training:
                # The periodic evaluation: the same response-only loss, and no training-token count.
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            self.real_tokens += tokens
            if use_fused_head and not (pair_ids is not None and self.orpo_beta):  # TRL's head has no ORPO term
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            elif model is self.model and not return_outputs:
                # TRL 1.15 always routes through a Triton-only fused LM head, which crashes on CPU
                # ('NoneType' object has no attribute 'apply'). We compute the same token-mean
                # cross-entropy ourselves, projecting only the response positions through the LM head.
                beta = self.orpo_beta
                if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
                    # The Trainer then adds up the micro-batches' losses without dividing them: the SFT part is
                    # already over the whole step's tokens, ORPO's mean over pairs is per micro-batch.
                    beta /= getattr(self, "current_gradient_accumulation_steps", 1) or 1
                result = response_only_loss(model, inputs, num_items_in_batch, row_lengths, pair_ids, beta)
            else:
                # Wrapped (DDP) models must run their own forward so gradient hooks fire.
                result = Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            loss = result[0] if return_outputs else result
            finite = torch.isfinite(loss.detach()).all()
            if loss.device.type == "cpu":
                if not finite:
                    raise NonFiniteLoss(self.state.global_step + 1, float(loss.detach().float().mean()))
            else:
                if self.first_bad_step is None:
                    self.first_bad_step = torch.zeros((), dtype=torch.long, device=loss.device)
                # The step goes in as a Python scalar: a tensor built from it would be a host-to-device copy.
                bad_now = (~finite) & (self.first_bad_step == 0)
                self.first_bad_step = torch.where(bad_now, self.state.global_step + 1, self.first_bad_step)
            return result

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.kernel_fallback is None:
                return super().training_step(model, inputs, num_items_in_batch)
            # The first step compiles every kernel for the real shapes: where one cannot run on this card,
            # the plan drops a level and the same batch runs again.
            while True:
                counted = self.real_tokens
                try:
                    loss = super().training_step(model, dict(inputs), num_items_in_batch)
                except (torch.cuda.OutOfMemoryError, NonFiniteLoss):
                    raise
                except Exception as err:  # noqa: BLE001 - compiler and kernel errors come in many types
                    self.real_tokens = counted
                    model.zero_grad(set_to_none=True)
                    if not self.kernel_fallback(err):
                        raise
                    continue
                self.kernel_fallback = None
                return loss

        def create_optimizer(self, model=None):
            fresh = self.optimizer is None  # the Trainer asks again later and gets the same optimizer back
            optimizer = super().create_optimizer(model)
            if fresh and self.loraplus_lr_ratio != 1.0:
                lora_b_faster(optimizer, self.model if model is None else model, self.loraplus_lr_ratio)
            return optimizer

        def raise_if_nonfinite(self):
            if self.first_bad_step is not None and int(self.first_bad_step) > 0:
                raise NonFiniteLoss(int(self.first_bad_step), float("nan"))

    return AfinarTrainer


def lora_b_faster(optimizer, model, ratio: float) -> None:
    """LoRA+ (Hayou et al., 2024): the lora_B matrices learn `ratio` times faster than lora_A.

    B starts at zero and maps the rank-r space to the layer's width; with one learning rate for both, B moves too
    slowly for the width and the adapter learns features late. Each of the Trainer's groups gives its lora_B
    parameters to a twin group with the scaled rate; the scheduler then scales every group alike.
    """
    lora_b = {id(p) for name, p in model.named_parameters() if "lora_B" in name}
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in lora_b]
        if moved:
            group["params"] = [p for p in group["params"] if id(p) not in lora_b]
            optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                                       "params": moved, "lr": group["lr"] * ratio})
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]


def _make_callbacks(layout: OutputLayout, save_minutes: float):
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """One fixed-format line per logging step, and metrics.jsonl rewritten atomically."""

        def __init__(self):
            self.rows: list[dict] = []
            self.start = None
            self.last_tokens = 0
            self.last_time = None
            self.trainer = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = self.last_time = time.perf_counter()
            # Resuming: keep what was logged before the interruption (rank 0 only: it alone writes the file).
            if layout.metrics.exists() and state.is_world_process_zero:
                self.rows = [json.loads(line) for line in layout.metrics.read_text().splitlines() if line.strip()]
                self.rows = [r for r in self.rows if r["step"] <= state.global_step]

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "eval_loss" in logs and state.is_world_process_zero:
                self._eval_row(state, logs["eval_loss"])
                return
            if not logs or "loss" not in logs:
                return
            now = time.perf_counter()
            # Every rank logs at the same steps, so the sum is a safe collective; rank 0 alone writes and prints.
            tokens = distributed.sum_across_ranks(self.trainer.real_tokens if self.trainer else 0)
            if not state.is_world_process_zero:
                return
            rate = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
            self.last_tokens, self.last_time = tokens, now
            row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 3), "loss": round(logs["loss"], 5),
                   "learning_rate": logs.get("learning_rate"), "tokens_per_second": round(rate, 1),
                   "grad_norm": logs.get("grad_norm")}
            self.rows.append(row)
            atomic.write_jsonl(layout.metrics, self.rows)
            print(f"step={row['step']} loss={row['loss']:.4f} lr={row['learning_rate']:.2e} "
                  f"tokens_per_second={row['tokens_per_second']:.0f}", flush=True)

        def _eval_row(self, state, value: float) -> None:
            """eval_loss joins the training row of its step (evaluation runs right after that step's log),
            or gets a row of its own; readers of metrics.jsonl take "loss" and "eval_loss" where present."""
            row = self.rows[-1] if self.rows and self.rows[-1]["step"] == state.global_step else None
            if row is None:
                row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 3)}
                self.rows.append(row)
            row["eval_loss"] = round(value, 5)
            atomic.write_jsonl(layout.metrics, self.rows)
            print(f"step={row['step']} eval_loss={row['eval_loss']:.4f}", flush=True)

    class TimedCheckpointCallback(TrainerCallback):
        """Save every `save_minutes` as well as every `save_steps`: bounds the work a disconnect loses."""

        def __init__(self):
            self.last = time.monotonic()
            self.trainer = None

        def on_step_end(self, args, state, control, **kwargs):
            due = time.monotonic() - self.last >= save_minutes * 60
            # Each rank has its own clock: save when any rank is due, so that all ranks save the same step.
            if distributed.sum_across_ranks(int(due)) > 0:
                control.should_save = True
            if control.should_save:
                self.last = time.monotonic()
            # A GPU loss is checked lazily: before anything is logged or saved, and at the end.
            if self.trainer is not None and (control.should_save or control.should_log
                                             or state.global_step >= state.max_steps):
                self.trainer.raise_if_nonfinite()
            return control

        def on_save(self, args, state, control, **kwargs):
            # Called once the trainer has written the whole checkpoint: the marker, last, is what makes
            # --resume trust it (afinar.core.checkpoints).
            folder = layout.checkpoints / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                checkpoints.mark_complete(folder)

    return MetricsCallback(), TimedCheckpointCallback()


def last_checkpoint(layout: OutputLayout) -> Path | None:
    """The newest *complete* checkpoint: a kill during a save leaves a partial one above it."""
    return checkpoints.newest_complete(layout.checkpoints)[0]


def warmup_for(settings: dict[str, Any], examples: int, world_size: int = 1) -> float | int:
    """The warmup ratio, unless warmup would cover every step: with a linear warmup the first step's
    learning rate is 0, so `--max-steps 1` trained nothing and left the adapter unchanged."""
    ratio = settings["warmup_ratio"]
    if settings.get("max_steps"):
        total = settings["max_steps"]
    else:
        per_epoch = max(1, math.ceil(examples / (settings["batch_size"] * world_size)) // settings["grad_accum"])
        total = math.ceil(per_epoch * settings["epochs"])
    return 0 if math.ceil(total * ratio) >= total else ratio


def _restore_adapter_dtypes_(model, dtypes: dict) -> None:
    """TRL 1.15's SFTTrainer casts the LoRA weights of a 4-bit model to bf16 whatever the precision. With fp16
    (a T4, no bf16) the gradient scaler then fails on its first step ("..._unscale_cuda not implemented for
    'BFloat16'"); with bf16 the adapter would learn in bf16 on this path only. PEFT made them fp32, as the
    compiled and Unsloth engines keep them: put that back."""
    for name, param in model.named_parameters():
        wanted = dtypes.get(name)
        if wanted is not None and param.dtype != wanted:
            param.data = param.data.to(wanted)


def train(model, tokenizer, train_entries: list[dict], *, layout: OutputLayout, settings: dict[str, Any],
          precision: str, resume: bool = False, packing: bool = False, loss_impl: str = "auto",
          fixed_length: bool = False, open_rows: int = 1, share_prefix: bool = False,
          gradient_checkpointing: bool | None = None, eval_entries: list[dict] | None = None,
          kernel_fallback=None) -> dict[str, Any]:
    """Run SFT and return the metrics for run.json. The adapter itself is saved by the caller.

    fixed_length pads every row to max_seq_length: compiled layers then see one shape and compile once.
    gradient_checkpointing: the engine plan's choice; None leaves it to TRL (on by default), for Unsloth,
    which checkpoints in its own way.
    eval_entries: the held-out split; with settings["eval_steps"], its loss every that many steps.
    kernel_fallback: afinar.train.engine.kernel_fallback's function, tried when the first step fails.
    """
    from trl import SFTConfig

    # The shared prefix needs a 4D mask, which sdpa and eager attention take; the GPU engines pack their own way.
    share_prefix = share_prefix and unwrap_peft(model).config._attn_implementation in ("sdpa", "eager")
    orpo_beta = float(settings.get("orpo_beta") or 0.0)
    if orpo_beta and not (packing and share_prefix):
        raise UserError("--preference orpo necesita filas empaquetadas que compartan el prompt (el plan de CPU, con "
                        "atención sdpa o eager); con este motor usa --preference dpo.")
    dataset, shared = build_dataset(train_entries, tokenizer, settings["max_seq_length"], packing, open_rows,
                                    share_prefix, rejected=orpo_beta > 0)
    max_steps = settings.get("max_steps") or -1
    eval_steps = settings.get("eval_steps")
    # Unpacked, one row per entry: the loss of each held-out answer, as 04's perplexity scores it.
    eval_dataset = (build_dataset(eval_entries, tokenizer, settings["max_seq_length"], False)[0]
                    if eval_entries and eval_steps else None)
    config = SFTConfig(
        output_dir=str(layout.checkpoints),
        per_device_train_batch_size=settings["batch_size"],
        gradient_accumulation_steps=settings["grad_accum"],
        learning_rate=settings["learning_rate"],
        num_train_epochs=settings["epochs"],
        max_steps=max_steps,
        warmup_steps=warmup_for(settings, len(dataset), distributed.world_size()),  # below 1: a ratio of the steps
        lr_scheduler_type="linear",
        logging_steps=settings["logging_steps"],
        # Trainer's filter tests every step's loss for NaN with a Python `or` on GPU tensors: a wait for the
        # whole backward before the optimizer's kernels can be queued (an 11 ms idle GPU per step in the H200
        # profile). The NaN guard of AfinarTrainer already stops training on a non-finite loss.
        logging_nan_inf_filter=False,
        eval_strategy="steps" if eval_dataset is not None else "no",
        eval_steps=eval_steps if eval_dataset is not None else None,
        per_device_eval_batch_size=settings["batch_size"],
        prediction_loss_only=True,  # only the loss: no logits of the whole split kept in memory
        save_strategy="steps",
        save_steps=settings["save_steps"],
        save_total_limit=2,
        seed=settings["seed"],
        data_seed=settings["seed"],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        max_length=settings["max_seq_length"],
        packing=False,  # afinar.train.packing packs in order instead: TRL's packing would reorder the stream
        report_to="none",
        # The stream is already shuffled and interleaved (long essays / short Q&A) by afinar.data.pipeline;
        # a random sampler would undo the interleaving.
        train_sampling_strategy="sequential",
        # On a GPU two worker processes build the next padded batch while the GPU computes the current one
        # (in the main process the GPU would wait ~20 ms a step for it); on a 2-core CPU they would only
        # take cores from the matmuls.
        dataloader_num_workers=2 if _cuda() else 0,
        remove_unused_columns=False,
        use_cpu=not _cuda(),
        **_checkpointing_config(gradient_checkpointing),
        # Every LoRA matrix takes part in every forward: DDP need not search the graph for unused ones.
        ddp_find_unused_parameters=False,
    )
    trainer_cls = _make_trainer_class(loss_impl)
    metrics_cb, timed_cb = _make_callbacks(layout, settings["save_minutes"])
    collator = Collator(tokenizer.pad_token_id, pad_to=settings["max_seq_length"] if fixed_length else None,
                        rows=settings["batch_size"] if fixed_length else None)
    adapter_dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    trainer = trainer_cls(model=model, args=config, train_dataset=dataset, eval_dataset=eval_dataset,
                          processing_class=tokenizer, data_collator=collator, callbacks=[metrics_cb, timed_cb])
    _restore_adapter_dtypes_(model, adapter_dtypes)
    metrics_cb.trainer = timed_cb.trainer = trainer
    trainer.shared_prefix = len(shared)
    trainer.kernel_fallback = kernel_fallback
    trainer.loraplus_lr_ratio = float(settings.get("loraplus_lr_ratio") or 1.0)
    trainer.orpo_beta = orpo_beta

    resume_from = None
    if resume:
        resume_from, broken = checkpoints.newest_complete(layout.checkpoints)
        for folder, reason in broken:
            print(f"Se descarta {folder}: incompleto ({reason}), probablemente por una interrupción al guardarlo.")
        if distributed.is_main_process():
            checkpoints.remove_incomplete(broken)
        distributed.barrier()
        if resume_from is None:
            print("No hay checkpoints completos: el entrenamiento empieza desde el principio.")
        else:
            print(f"Reanudando desde {resume_from} (el último checkpoint completo, paso {checkpoints.step_of(resume_from)})")
    started = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        trainer.raise_if_nonfinite()
    except NonFiniteLoss as err:
        good = last_checkpoint(layout)
        kept = f"Se conserva el último checkpoint bueno: {good}." if good else "No había ningún checkpoint guardado."
        raise UserError(
            f"La pérdida dejó de ser finita ({err.value}) en el paso {err.step}: el entrenamiento se detuvo y no se "
            f"guardó ningún adaptador. {kept} Prueba con un --learning-rate más bajo o revisa los datos."
        ) from None
    seconds = time.perf_counter() - started
    rows = metrics_cb.rows
    real_tokens = distributed.sum_across_ranks(trainer.real_tokens)
    _plot_loss(layout, rows)
    logged = [r for r in rows if "loss" in r]
    evaluated = [r for r in rows if "eval_loss" in r]
    return {
        "global_step": trainer.state.global_step,
        "planned_steps": trainer.state.max_steps,
        "final_loss": logged[-1]["loss"] if logged else output.training_loss,
        "first_loss": logged[0]["loss"] if logged else None,
        "final_eval_loss": evaluated[-1]["eval_loss"] if evaluated else None,
        "train_loss": output.training_loss,
        "seconds": round(seconds, 1),
        "real_tokens": real_tokens,
        "tokens_per_second": round(real_tokens / max(seconds, 1e-9), 1),
        "train_examples": len(dataset),
        "shared_prefix_tokens": len(shared),
        "resumed_from": str(resume_from.relative_to(layout.root)) if resume_from else None,
        "fused_lm_head": uses_fused_head(loss_impl),
        "loss_impl": loss_impl,
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _checkpointing_config(gradient_checkpointing: bool | None) -> dict[str, Any]:
    """The engine plan's gradient checkpointing for SFTConfig, which otherwise turns it on by default.

    On CPU it is always off: the activations of the 135M model fit in memory many times over, and with it
    every decoder layer ran its forward twice, ~35 % of a CPU step (BENCHMARKS.md); same numbers without it.
    On a GPU the plan decides; None (Unsloth, which checkpoints its own way) leaves TRL's default.
    """
    if not _cuda():
        return {"gradient_checkpointing": False}
    return {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}


def _plot_loss(layout: OutputLayout, rows: list[dict]) -> None:
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = [r for r in rows if "loss" in r]
    evaluated = [r for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in logged], [r["loss"] for r in logged], marker="o", markersize=3,
            label="entrenamiento")
    if evaluated:
        ax.plot([r["step"] for r in evaluated], [r["eval_loss"] for r in evaluated], marker="s", markersize=4,
                label="evaluación (entradas apartadas)")
        ax.legend()
    ax.set_xlabel("paso")
    ax.set_ylabel("pérdida (entropía cruzada)")
    ax.set_title("Curva de pérdida del entrenamiento")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic.atomic_path(layout.loss_plot) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def finite_adapter(peft_model) -> bool:
    import torch

    return all(torch.isfinite(p).all() for n, p in peft_model.named_parameters() if "lora_" in n)
