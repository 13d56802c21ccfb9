"""Stage 03: check the data, train the LoRA adapter, save it with its metrics."""

from __future__ import annotations

import time
from typing import Any

from . import distributed, manifest, modeling, settings
from .environment import detect_device
from .errors import UserError
from .layout import OutputLayout


def check_only(dataset_path: str) -> str:
    from .data import check_only as _check_only

    return _check_only(dataset_path)


def _refuse_rerun(layout: OutputLayout, run_manifest: dict, overwrite: bool, resume: bool) -> None:
    record = run_manifest.get("stages", {}).get("train")
    if record and record.get("status") == "done" and not (overwrite or resume):
        raise UserError(
            f"La etapa 03 ya entrenó un adaptador en {layout.adapter} ({record.get('finished_at')}). "
            f"Usa --overwrite para entrenar de nuevo desde cero."
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
    from .prompts import tokenize_example

    return [tokenize_example(tokenizer, entry, max_seq_length) for entry in entries[:count]]


def _preference_phase(model, tokenizer, train_entries: list[dict], resolved: dict[str, Any], device_kind: str,
                      precision: str) -> dict[str, Any]:
    """DPO after SFT on the entries that carry a misconception ('rejected'), unless --preference none."""
    from . import preference

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


def run(args) -> dict[str, Any]:
    distributed.configure_process()
    layout = OutputLayout.at(args.output_dir)
    run_manifest = manifest.read(layout)
    manifest.require_stage(run_manifest, "load", layout)
    _refuse_rerun(layout, run_manifest, args.overwrite, args.resume)
    if args.overwrite and not args.resume and distributed.is_main_process():
        import shutil

        shutil.rmtree(layout.checkpoints, ignore_errors=True)
        layout.metrics.unlink(missing_ok=True)

    print("Ajustes (heredados de la etapa 02 salvo que una opción los cambie):")
    recorded = run_manifest["settings"]
    overrides = {key: getattr(args, key, None) for key in settings.TRAIN_KEYS}
    resolved = {**recorded, **settings.inherit(recorded, overrides, settings.TRAIN_KEYS)}
    device = detect_device()
    from . import engine

    # Checked before the data work (a wrong --engine fails fast); re-planned below with the data's size.
    plan = engine.plan(resolved, device, resolved.get("engine") or "auto")
    _refuse_unsloth_across_processes(plan.backend)

    from transformers import AutoTokenizer

    from .data import prepare
    from .prompts import ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(resolved["base_path"], trust_remote_code=False)
    ensure_pad_token(tokenizer)
    prepared = prepare(
        args.dataset, hub_specs=args.hub_dataset or (), hub_ratio=args.hub_ratio,
        keep_duplicates=args.keep_duplicates, drop_non_spanish=args.drop_non_spanish, mix_ratio=args.mix_ratio,
        eval_fraction=args.eval_fraction, seed=resolved["seed"], tokenizer=tokenizer,
        max_seq_length=resolved["max_seq_length"], layout=layout if distributed.is_main_process() else None,
    )
    # Every rank builds the same ordered data; only rank 0 writes the report. The barrier also makes sure
    # rank 0 has cleared old checkpoints (--overwrite) before anyone trains, and binds each rank to its GPU.
    distributed.barrier()

    plan = engine.plan(resolved, device, resolved.get("engine") or "auto",
                       packed_rows=(prepared.summary.get("packing") or {}).get("rows"))
    resolved.update(batch_size=plan.batch_size, packing=plan.packing)
    precision = resolved.get("precision") or "fp32"
    if plan.engine == "compiled" and precision != "bf16":
        precision = "bf16"  # the compiled engine trains on a bf16 base (it is only picked where bf16 exists)
    print("Cargando el modelo con el adaptador inicial ...", flush=True)
    model, tokenizer = modeling.build(resolved, device, precision, adapter_dir=layout.initial_adapter, plan=plan)
    engine.prepare_model_(model, plan, probe_rows(prepared.train, tokenizer, resolved["max_seq_length"]))
    print(f"Motor de entrenamiento: {plan.engine} (lote {plan.batch_size}, empaquetado "
          f"{'sí' if plan.packing else 'no'}, checkpointing {'sí' if plan.gradient_checkpointing else 'no'}"
          f"{', FP8 en la base' if plan.fp8_base else ''})")
    for reason in plan.reasons:
        print(f"  {reason}")

    from .training import finite_adapter, train

    started = time.perf_counter()
    metrics = train(model, tokenizer, prepared.train, layout=layout, settings=resolved, precision=precision,
                    resume=args.resume, packing=resolved["packing"],
                    fixed_length=plan.compile_layers, open_rows=plan.open_rows,
                    gradient_checkpointing=plan.trainer_checkpointing)
    metrics["engine"] = plan.as_dict()
    metrics["preference"] = _preference_phase(model, tokenizer, prepared.train, resolved, device.kind, precision)
    if not finite_adapter(model):
        raise UserError("El adaptador entrenado contiene NaN o infinitos: no se guarda. Baja --learning-rate.")
    if not distributed.is_main_process():
        return {"layout": layout, "metrics": metrics}
    modeling.save_adapter(model, tokenizer, layout.adapter, run_manifest["model"]["base_model"])

    run_manifest["settings"] = resolved
    manifest.record_stage(
        layout, run_manifest, "train",
        seconds=round(time.perf_counter() - started, 1), dataset=str(args.dataset), data=prepared.summary,
        metrics=metrics, world_size=distributed.world_size(), adapter=manifest.relative(layout, layout.adapter),
        metrics_file=manifest.relative(layout, layout.metrics), loss_plot=manifest.relative(layout, layout.loss_plot),
        eval_split=manifest.relative(layout, layout.eval_split) if layout.eval_split.exists() else None,
    )
    return {"layout": layout, "metrics": metrics}
