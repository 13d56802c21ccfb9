"""Stage 02: load the base model with a fresh LoRA adapter, record the 'before' answers, create run.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from afinar.core import atomic, manifest, overwrite, settings, validation
from afinar.core.environment import detect_device, DeviceInfo, library_versions, precision_for
from afinar.core.errors import UserError
from afinar.core.layout import OutputLayout
from afinar.core.prompts import configure_from_manifest, DEFAULT_SYSTEM_PROMPT
from afinar.evaluate.generation import check_repetition_penalty, DEFAULT_REPETITION_PENALTY, generate_answers
from afinar.evaluate.probe import DEFAULT_PROBE_FILE, load_pairs
from afinar.evaluate.questions import load_questions
from afinar.train import modeling


def prepare_output_dir(layout: OutputLayout, replace: bool) -> bool:
    """Refuse an output directory that cannot be used; return whether its old content must be replaced.

    Nothing is deleted here: the old content is only moved aside once every check has passed (run()).
    """
    root = layout.root
    if root.exists() and not root.is_dir():
        raise UserError(f"--output-dir {root}: existe y es un archivo, no una carpeta. Elige otro --output-dir.")
    existing = root if root.exists() else next((p for p in root.absolute().parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"--output-dir {root}: {existing} es un archivo, no una carpeta. Elige otro --output-dir.")
    validation.require_writable(root)
    if root.exists() and any(root.iterdir()):
        if not replace:
            produced = ""
            if layout.manifest.exists():
                try:
                    data = manifest.read(layout)
                    done = [f"{name} ({rec.get('finished_at', '?')})" for name, rec in data.get("stages", {}).items()]
                    produced = f" Contiene el resultado de las etapas: {', '.join(done) or 'ninguna terminada'}."
                except UserError:
                    pass
            raise UserError(
                f"El directorio de salida {root} no está vacío.{produced} Usa --overwrite para empezar de nuevo "
                f"(se borrará su contenido) o elige otro --output-dir."
            )
        here = Path.cwd().resolve()
        if root.resolve() == here or root.resolve() in here.parents:
            # --overwrite would replace the folder this command runs in (the repository, with --output-dir .).
            raise UserError(f"--output-dir {root} es la carpeta de trabajo o la contiene: --overwrite no la "
                            f"vacía. Elige una carpeta propia para la salida, p. ej. --output-dir salida.")
        return True
    return False


def run(args) -> dict[str, Any]:
    """Stage 02, step by step: every option is checked before the output directory is touched."""
    layout = OutputLayout.at(args.output_dir)
    device = detect_device()
    chosen = _check_options(args, device)  # 1. model, backend, precision, prompts, questions, probe
    replacing = prepare_output_dir(layout, args.overwrite)  # 2. an output dir this run may use
    # 3. The old run is moved aside, not deleted: a failure below (a model that does not load, Ctrl+C) puts it
    # back, and it is deleted only once this stage has finished.
    with overwrite.set_aside([layout.root] if replacing else []):
        layout.root.mkdir(parents=True, exist_ok=True)
        run_manifest = _create_manifest(args, layout, device, chosen)  # 4. run.json: settings, device, versions
        started = time.perf_counter()
        model, tokenizer = _build(run_manifest, device, layout)  # 5. base + fresh LoRA, saved as adapter_inicial/
        load_seconds = time.perf_counter() - started
        rows = _answer_before(args, layout, run_manifest, model, tokenizer, chosen["questions"])  # 6. «antes»
        manifest.record_stage(  # 7. the stage, recorded
            layout, run_manifest, "load",
            seconds=round(time.perf_counter() - started, 1), load_seconds=round(load_seconds, 1),
            trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
            initial_adapter=manifest.relative(layout, layout.initial_adapter),
            answers_before=manifest.relative(layout, layout.answers_before),
        )
    return {"layout": layout, "rows": rows}


# ----------------------------------------------------------------------------------------------- the steps


def _check_options(args, device: DeviceInfo) -> dict[str, Any]:
    model_name = args.model or (settings.GPU_DEFAULT_MODEL if device.kind == "cuda" else settings.CPU_DEFAULT_MODEL)
    backend = modeling.resolve_backend(args.backend, device)
    if args.load_in_4bit and device.kind != "cuda":
        raise UserError("--load-in-4bit necesita una GPU con CUDA (bitsandbytes); en CPU el modelo se carga en fp32.")
    load_in_4bit = device.kind == "cuda" if args.load_in_4bit is None else args.load_in_4bit
    precision = precision_for(device, args.precision)
    requested = getattr(args, "repetition_penalty", None)
    repetition_penalty = float(DEFAULT_REPETITION_PENALTY if requested is None else requested)
    check_repetition_penalty(repetition_penalty)
    system_prompt = _system_prompt(getattr(args, "system_prompt", None), getattr(args, "system_prompt_file", None))
    questions = load_questions(args.questions)
    probe_file = _probe_file(getattr(args, "probe_file", None))
    print(f"Dispositivo: {device.kind} ({device.name}); backend: {backend}; modelo: {model_name}", flush=True)
    display_name, base_path = modeling.resolve_model(model_name)  # before touching the output dir
    _check_lora_layers(base_path, getattr(args, "lora_layers", None))
    return {"display_name": display_name, "base_path": base_path, "backend": backend, "load_in_4bit": load_in_4bit,
            "precision": precision, "repetition_penalty": repetition_penalty, "system_prompt": system_prompt,
            "questions": questions, "probe_file": probe_file}


def _create_manifest(args, layout: OutputLayout, device: DeviceInfo, chosen: dict[str, Any]) -> dict[str, Any]:
    """run.json as stage 02 leaves it for 03 and 04: every setting resolved, nothing left to guess."""
    resolved = {key: settings.default(key, device.kind) for key in settings.TRAIN_KEYS}
    resolved.update({
        "model": chosen["display_name"], "base_path": chosen["base_path"], "backend": chosen["backend"],
        "load_in_4bit": chosen["load_in_4bit"],
        "lora_r": args.lora_r,
        "lora_alpha": (args.lora_alpha if args.lora_alpha is not None
                       else settings.lora_alpha_for(args.lora_r, device.kind)),
        "lora_dropout": args.lora_dropout, "precision": chosen["precision"],
        "lora_layers": getattr(args, "lora_layers", None) or settings.default("lora_layers", device.kind),
    })
    if args.max_seq_length is not None:  # 0 is refused by the parser, never replaced by the default
        resolved["max_seq_length"] = args.max_seq_length
    if args.seed is not None:
        resolved["seed"] = args.seed
    run_manifest = {
        "schema": 1,
        "created_at": manifest.now_iso(),
        "model": {"base_model": chosen["display_name"], "base_path": chosen["base_path"],
                  "backend": chosen["backend"], "load_in_4bit": chosen["load_in_4bit"]},
        "settings": resolved,
        "device": device.as_dict(),
        "versions": library_versions(),
        "questions_file": str(Path(args.questions).resolve()),
        "probe_file": chosen["probe_file"],
        "system_prompt": chosen["system_prompt"],
        "generation": {"max_new_tokens": args.max_new_tokens, "do_sample": False, "batch_size": args.gen_batch_size,
                       "repetition_penalty": chosen["repetition_penalty"]},
        "stages": {},
    }
    manifest.write(layout, run_manifest)
    configure_from_manifest(run_manifest)  # the "antes" answers are asked with the run's system prompt
    return run_manifest


def _build(run_manifest: dict, device: DeviceInfo, layout: OutputLayout):
    resolved = run_manifest["settings"]
    print("Cargando el modelo base y preparando LoRA ...", flush=True)
    model, tokenizer = modeling.build(resolved, device, resolved["precision"])
    modeling.save_adapter(model, tokenizer, layout.initial_adapter, run_manifest["model"]["base_model"])
    return model, tokenizer


def _answer_before(args, layout: OutputLayout, run_manifest: dict, model, tokenizer, questions) -> list[dict]:
    print(f"Respondiendo {len(questions)} preguntas de contraste con el modelo base (antes) ...", flush=True)
    with model.disable_adapter():
        rows = generate_answers(model, tokenizer, questions, max_new_tokens=args.max_new_tokens,
                                batch_size=args.gen_batch_size, seed=run_manifest["settings"]["seed"],
                                repetition_penalty=run_manifest["generation"]["repetition_penalty"])
    atomic.write_jsonl(layout.answers_before, rows)
    return rows


def _system_prompt(text: str | None, path: str | None) -> str:
    """The run's system prompt: --system-prompt, the text of --system-prompt-file, or the default."""
    option = "--system-prompt"
    if path is not None:
        option = "--system-prompt-file"
        file = Path(path)
        if not file.is_file():
            raise UserError(f"--system-prompt-file {path}: el archivo no existe. Comprueba la ruta.")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"--system-prompt-file {path}: no es texto UTF-8 (byte {err.start}). Guárdalo como "
                            f"UTF-8.") from None
        except OSError as err:
            raise UserError(f"--system-prompt-file {path}: no se puede leer ({err.strerror}).") from None
    if text is None:
        return DEFAULT_SYSTEM_PROMPT
    text = text.strip()
    why = validation.problem("system_prompt", text)
    if why:
        raise UserError(f"{option}{' ' + path if path else ''}: {why}.")
    return text


def _check_lora_layers(base_path: str, lora_layers: int | None) -> None:
    if lora_layers is None:
        return
    try:
        total = int(json.loads((Path(base_path) / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # a hub model not yet downloaded: checked again when LoRA is added
    if not 1 <= lora_layers <= total:
        raise UserError(f"--lora-layers {lora_layers}: el modelo tiene {total} capas; usa un número entre 1 y {total}.")


def _probe_file(path: str | None) -> str | None:
    """The probe file, checked now (before anything is written) and recorded for stage 04; None = no probe.

    Without --probe-file, the project's own pairs (next to the scripts, whatever the working folder).
    """
    if path == "none":
        return None
    if path is None:
        path = str(Path(__file__).resolve().parents[2] / DEFAULT_PROBE_FILE)
        if not Path(path).is_file():
            return None

    load_pairs(path)
    return str(Path(path).resolve())
