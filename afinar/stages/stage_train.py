"""Stage 03: check the data, train the LoRA adapter, save it with its metrics."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from afinar.core import checkpoints, distributed, manifest, overwrite, settings, validation
from afinar.core.environment import detect_device, DeviceInfo
from afinar.core.errors import UserError
from afinar.core.layout import OutputLayout
from afinar.core.prompts import configure_from_manifest, ensure_pad_token, tokenize_example
from afinar.data.pipeline import check_only, prepare, PreparedData
from afinar.train import engine, frozen_prefix, modeling, preference
from afinar.train.training import finite_adapter, train

__all__ = ["check_only", "probe_rows", "run"]  # check_only: what `03_train_model.py --check-data` runs


def run(args) -> dict[str, Any]:
    """Stage 03, step by step; barriers, overrides and special cases live inside the steps."""
    distributed.configure_process()
    layout, run_manifest = _open_manifest(args)  # 1. run.json, with stage 02 done and nothing to overwrite
    resolved = _resolve_settings(args, layout, run_manifest)  # 2. 02's settings, with this run's flags on top
    device = detect_device()
    _check_engine(resolved, device)  # 3. a wrong --engine fails now, before the data work
    with _fresh_outputs(args, layout, run_manifest):  # 4. old outputs aside, back in place if this run fails
        prepared = _prepare_data(args, layout, resolved)  # 5. check, clean, hold out, mix, order, measure
        plan, precision = _plan_engine(resolved, device, prepared)  # 6. engine, batch and precision for this data
        model, tokenizer, prefix = _build(resolved, device, precision, layout, plan, prepared)  # 7. base + adapter
        started = time.perf_counter()
        metrics = _train(args, model, tokenizer, prepared, layout, resolved, plan, precision, device, prefix)  # 8.
        if distributed.is_main_process():  # 9. adapter, run.json (rank 0 only)
            _save(args, layout, run_manifest, resolved, model, tokenizer, prepared, metrics, started)
    return {"layout": layout, "metrics": metrics}


# ----------------------------------------------------------------------------------------------- the steps


def _open_manifest(args) -> tuple[OutputLayout, dict]:
    layout = OutputLayout.at(args.output_dir)
    run_manifest = manifest.read(layout)
    manifest.require_stage(run_manifest, "load", layout)
    validation.require_writable(layout.root)
    _refuse_rerun(layout, run_manifest, args.overwrite, args.resume)
    modeling.ensure_base_path(run_manifest)
    configure_from_manifest(run_manifest)  # training sees the system prompt chosen in stage 02
    return layout, run_manifest


def _resolve_settings(args, layout: OutputLayout, run_manifest: dict) -> dict[str, Any]:
    print("Ajustes (heredados de la etapa 02 salvo que una opción los cambie):")
    recorded = run_manifest["settings"]
    overrides = {key: getattr(args, key, None) for key in settings.TRAIN_KEYS}
    resolved = {**recorded, **settings.inherit(recorded, overrides, settings.TRAIN_KEYS)}
    _refuse_nothing_to_resume(layout, resolved, args.resume)
    return resolved


def _check_engine(resolved: dict, device: DeviceInfo) -> None:
    # Re-planned in step 6 with the data's size; this first plan only refuses what can never run.
    plan = engine.plan(resolved, device, resolved.get("engine") or "auto")
    _refuse_unsloth_across_processes(plan.backend)
    if resolved.get("preference") == "orpo":
        if not plan.share_prefix:
            # The rejected answer rides in its example's row as a branch of the shared prompt (a 4D mask): only the
            # CPU plan packs that way. The GPU engines (Unsloth, compiled flex attention) pack their own way.
            raise UserError("--preference orpo solo está disponible en CPU, donde las filas comparten el prompt. En "
                            "GPU usa --preference dpo.")
        if distributed.is_distributed():
            # Under DDP the wrapped model runs the Trainer's own loss (AfinarTrainer.compute_loss), with no ORPO term.
            raise UserError("--preference orpo funciona con un solo proceso; con varios (torchrun) usa --preference "
                            "dpo.")


@contextmanager
def _fresh_outputs(args, layout: OutputLayout, run_manifest: dict) -> Iterator[None]:
    """Everything that can be checked before reading the data has been: only now do the previous run's
    outputs go. A fresh start moves them aside (restored if this run fails, deleted once it succeeds);
    --resume keeps them, they are what it resumes from. The adapter is replaced atomically at the end.
    datos/ goes too: a failed run must not leave an evaluation split that overlaps the old adapter's data."""
    main = distributed.is_main_process()
    aside = [layout.data_dir, layout.checkpoints, layout.metrics, layout.loss_plot] if main and not args.resume else []
    if main:
        run_manifest["train_in_progress"] = {"started_at": manifest.now_iso(), "overwrite": bool(args.overwrite)}
        manifest.write(layout, run_manifest)
    moved: list = []
    try:
        with overwrite.set_aside(aside) as moved:
            distributed.barrier()  # no rank reads or writes before rank 0 has moved the old outputs
            yield
    except Exception:
        # A failed run leaves the directory as it found it: the old outputs are back (set_aside), and
        # run.json no longer says a training is under way. A kill leaves the mark, so --resume is allowed.
        if main:
            run_manifest.pop("train_in_progress", None)
            manifest.write(layout, run_manifest)
            if moved:
                print("Se restauraron los resultados anteriores: "
                      + ", ".join(manifest.relative(layout, p) for p in moved) + ".")
        raise


def _prepare_data(args, layout: OutputLayout, resolved: dict) -> PreparedData:
    # Delayed: transformers takes seconds to import, and --check-data (which imports this module) needs none of it.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolved["base_path"], trust_remote_code=False)
    ensure_pad_token(tokenizer)
    prepared = prepare(
        args.dataset, hub_specs=args.hub_dataset or (), hub_ratio=args.hub_ratio,
        keep_duplicates=args.keep_duplicates, drop_non_spanish=args.drop_non_spanish, mix_ratio=args.mix_ratio,
        eval_fraction=args.eval_fraction, seed=resolved["seed"], tokenizer=tokenizer,
        max_seq_length=resolved["max_seq_length"], layout=layout if distributed.is_main_process() else None,
    )
    # Every rank builds the same ordered data; only rank 0 writes the report. The barrier also binds each
    # rank to its GPU.
    distributed.barrier()
    return prepared


def _plan_engine(resolved: dict, device: DeviceInfo, prepared: PreparedData) -> tuple[engine.Plan, str]:
    plan = engine.plan(resolved, device, resolved.get("engine") or "auto",
                       packed_rows=(prepared.summary.get("packing") or {}).get("rows"))
    resolved.update(batch_size=plan.batch_size, packing=plan.packing)
    precision = resolved.get("precision") or "fp32"
    if plan.precision:
        precision = plan.precision  # the compiled engine trains on a 16-bit base: bf16, or fp16 on a T4
    return plan, precision


def _build(resolved: dict, device: DeviceInfo, precision: str, layout: OutputLayout, plan: engine.Plan,
           prepared: PreparedData):
    """The model with the initial adapter, made ready for the plan; on a CPU with LoRA on the top layers only,
    the frozen layers below run once per row, not once per epoch (the prefix, or None)."""
    print("Cargando el modelo con el adaptador inicial ...", flush=True)
    model, tokenizer = modeling.build(resolved, device, precision, adapter_dir=layout.initial_adapter, plan=plan)
    engine.prepare_model_(model, plan, probe_rows(prepared.train, tokenizer, resolved["max_seq_length"]))
    print(f"Motor de entrenamiento: {plan.engine} (lote {plan.batch_size}, empaquetado "
          f"{'sí' if plan.packing else 'no'}, checkpointing {'sí' if plan.gradient_checkpointing else 'no'}"
          f"{', FP8 en la base' if plan.fp8_base else ''})")
    for reason in plan.reasons:
        print(f"  {reason}")
    prefix = frozen_prefix.attach(model) if device.kind != "cuda" else None
    if prefix is not None:
        print(f"Capas congeladas 0-{prefix.start - 1}: se calculan una vez por fila y se guardan; las épocas "
              f"siguientes y las preferencias solo recorren las {model.config.num_hidden_layers - prefix.start} "
              f"capas con LoRA.")
    return model, tokenizer, prefix


def _train(args, model, tokenizer, prepared: PreparedData, layout: OutputLayout, resolved: dict, plan: engine.Plan,
           precision: str, device: DeviceInfo, prefix) -> dict[str, Any]:
    """SFT, then preferences; refused if the adapter came out non-finite or unchanged."""
    before = _lora_snapshot(model)
    orpo = _orpo_record(resolved, prepared.train, device.kind)
    metrics = train(model, tokenizer, prepared.train, layout=layout,
                    settings={**resolved, "orpo_beta": orpo["beta"] if orpo else 0.0}, precision=precision,
                    resume=args.resume, packing=resolved["packing"],
                    fixed_length=plan.compile_layers, open_rows=plan.open_rows, share_prefix=plan.share_prefix,
                    gradient_checkpointing=plan.trainer_checkpointing, eval_entries=prepared.eval,
                    kernel_fallback=engine.kernel_fallback(model, plan))
    metrics["engine"] = plan.as_dict()
    metrics["preference"] = orpo or _preference_phase(model, tokenizer, prepared.train, resolved, device.kind,
                                                      precision)
    if prefix is not None:
        metrics["frozen_prefix"] = prefix.summary()
        frozen_prefix.detach(model)
    if not finite_adapter(model):
        raise UserError("El adaptador entrenado contiene NaN o infinitos: no se guarda. Baja --learning-rate.")
    _check_it_trained(metrics, model, before, resolved["max_seq_length"])
    return metrics


def _save(args, layout: OutputLayout, run_manifest: dict, resolved: dict, model, tokenizer, prepared: PreparedData,
          metrics: dict, started: float) -> None:
    modeling.save_adapter(model, tokenizer, layout.adapter, run_manifest["model"]["base_model"])
    run_manifest["settings"] = resolved
    run_manifest.pop("train_in_progress", None)
    manifest.record_stage(
        layout, run_manifest, "train",
        seconds=round(time.perf_counter() - started, 1), dataset=str(args.dataset), data=prepared.summary,
        metrics=metrics, world_size=distributed.world_size(), adapter=manifest.relative(layout, layout.adapter),
        metrics_file=manifest.relative(layout, layout.metrics),
        loss_plot=manifest.relative(layout, layout.loss_plot) if layout.loss_plot.exists() else None,
        eval_split=manifest.relative(layout, layout.eval_split) if layout.eval_split.exists() else None,
    )
    overwrite.discard_leftovers([layout.data_dir, layout.checkpoints, layout.metrics, layout.loss_plot])


# ------------------------------------------------------------------------------------- what the steps refuse


def _refuse_rerun(layout: OutputLayout, run_manifest: dict, overwrite: bool, resume: bool) -> None:
    record = manifest.finished(run_manifest, "train")
    if record is None or overwrite:
        return
    if not resume:
        raise UserError(
            f"La etapa 03 ya entrenó un adaptador en {layout.adapter} ({record.get('finished_at')}). "
            f"Usa --overwrite para entrenar de nuevo desde cero."
        )
    # --resume continues from a checkpoint; it must not become a way round the guard above by starting over.
    if checkpoints.newest_complete(layout.checkpoints)[0] is None:
        raise UserError(
            f"--resume: la etapa 03 ya terminó ({record.get('finished_at')}) y no queda ningún checkpoint completo "
            f"en {layout.checkpoints} del que reanudar; empezar de cero sustituiría el adaptador de {layout.adapter}. "
            f"Usa --overwrite para entrenar de nuevo desde cero."
        )


def _refuse_nothing_to_resume(layout: OutputLayout, resolved: dict, resume: bool) -> None:
    """Checked before any loading: resuming at or past --max-steps has nothing left to train."""
    if not resume or not resolved.get("max_steps"):
        return
    found = checkpoints.newest_complete(layout.checkpoints)[0]
    if found is not None and checkpoints.step_of(found) >= resolved["max_steps"]:
        raise UserError(
            f"--resume: el último checkpoint completo ({found}) ya está en el paso {checkpoints.step_of(found)} y "
            f"max_steps es {resolved['max_steps']}: no queda nada por entrenar. Sube --max-steps para seguir "
            f"entrenando, o usa --overwrite para empezar de cero."
        )


def _lora_snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def _check_it_trained(metrics: dict, model, before: dict, max_seq_length: int) -> None:
    """A run that trained nothing must not end in "Listo" with the stage marked done."""
    resumed_at = checkpoints.step_of(Path(metrics["resumed_from"])) if metrics["resumed_from"] else 0
    new_steps = metrics["global_step"] - (resumed_at or 0)
    # Resumed at or past the planned end, the trainer still runs one step, at learning rate 0.
    if new_steps <= 0 or (resumed_at and resumed_at >= metrics["planned_steps"]):
        raise UserError(
            f"El entrenamiento no dio ningún paso (paso final {metrics['global_step']}, planificados "
            f"{metrics['planned_steps']}"
            + (f", reanudado desde el paso {resumed_at}" if resumed_at else "")
            + "): no se guarda el adaptador. Sube --max-steps o --epochs, o usa --overwrite para empezar de cero."
        )
    import torch

    after = dict(model.named_parameters())
    if all(torch.equal(after[name].detach(), value) for name, value in before.items()):
        raise UserError(
            f"El entrenamiento dio {new_steps} pasos pero el adaptador no cambió: no se guarda. Suele pasar cuando "
            f"ningún ejemplo conserva tokens de respuesta con --max-seq-length {max_seq_length} (súbelo) o con una "
            f"--learning-rate demasiado baja."
        )


def _refuse_unsloth_across_processes(backend: str) -> None:
    if backend == "unsloth" and distributed.is_distributed():
        raise UserError(
            f"Entrenar con varios procesos ({distributed.world_size()}) solo está verificado con --backend hf "
            f"(transformers + PEFT bajo DDP); la etapa 02 eligió Unsloth. Ejecuta de nuevo la etapa 02 con "
            f"--backend hf --overwrite, o entrena con un solo proceso (python 03_train_model.py)."
        )


def probe_rows(entries: list[dict], tokenizer, max_seq_length: int, count: int = 8) -> list[dict]:
    """The first few training examples, tokenized: the rows the FP8 check compares losses on."""
    return [tokenize_example(tokenizer, entry, max_seq_length) for entry in entries[:count]]


def _orpo_record(resolved: dict[str, Any], train_entries: list[dict], device_kind: str) -> dict[str, Any] | None:
    """With --preference orpo, run.json's preference record: its beta goes to the SFT's loss
    (afinar.train.training.response_only_loss). None otherwise."""
    if resolved.get("preference") != "orpo":
        return None
    found = preference.triples(train_entries)
    if not found:
        raise UserError("--preference orpo: ninguna entrada de entrenamiento trae el campo 'rejected' (la respuesta "
                        "equivocada que debe perder). Añádelo a tus datos o usa --preference none.")
    if resolved.get("orpo_beta") is None:  # a run.json from before the setting existed
        resolved["orpo_beta"] = settings.default("orpo_beta", device_kind)
    print(f"Preferencias (ORPO dentro del SFT, beta {resolved['orpo_beta']}): {len(found)} pares (correcta, error); "
          f"cada respuesta equivocada va en la fila de su ejemplo.", flush=True)
    return {"mode": "orpo", "pairs": len(found), "beta": float(resolved["orpo_beta"])}


def _preference_phase(model, tokenizer, train_entries: list[dict], resolved: dict[str, Any], device_kind: str,
                      precision: str) -> dict[str, Any]:
    """DPO after SFT on the entries that carry a misconception ('rejected'), unless --preference none."""
    for key in ("preference", "dpo_beta", "preference_epochs", "preference_learning_rate"):
        if resolved.get(key) is None:  # a run.json from before these settings existed
            resolved[key] = settings.default(key, device_kind)
    mode = resolved["preference"]
    found = preference.triples(train_entries)
    if mode == "none" or (mode == "auto" and not found):
        if mode == "auto":
            print("Preferencias: ninguna entrada trae 'rejected'; solo SFT.")
        return {"mode": "none", "pairs": 0}
    if not found:
        raise UserError("--preference dpo: ninguna entrada de entrenamiento trae el campo 'rejected' (la respuesta "
                        "equivocada que debe perder). Añádelo a tus datos o usa --preference none.")
    print(f"Preferencias (DPO): {len(found)} pares (correcta, error) ...", flush=True)
    return preference.train_preference(
        model, tokenizer, train_entries, max_seq_length=resolved["max_seq_length"], beta=resolved["dpo_beta"],
        epochs=resolved["preference_epochs"], learning_rate=resolved["preference_learning_rate"],
        batch_size=8, sft_weight=1.0, seed=resolved["seed"], precision=precision, max_steps=resolved.get("max_steps"))
