"""Stage 04: the 'after' answers and the contrast report, then merge, GGUF, model card and push."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from afinar.core import atomic, manifest, overwrite
from afinar.core.environment import detect_device
from afinar.core.errors import UserError
from afinar.core.layout import OutputLayout
from afinar.core.models import free_gpu_memory, model_device, unwrap_peft
from afinar.core.prompts import configure_from_manifest
from afinar.data.data_check import read_dataset
from afinar.evaluate import probe
from afinar.evaluate.contrast import build_contrast
from afinar.evaluate.generation import chat, DEFAULT_BATCH_SIZE, DEFAULT_REPETITION_PENALTY, generate_answers
from afinar.evaluate.perplexity import perplexity
from afinar.evaluate.questions import load_questions
from afinar.evaluate.report import write_reports
from afinar.export.export_worker import run_export
from afinar.export.hub import check_push_access, get_token, push
from afinar.export.model_card import write_model_card
from afinar.train import modeling


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _eval_entries(layout: OutputLayout, eval_file: str | None) -> tuple[list[dict], str | None]:
    if eval_file:
        # The same checks as the training data: a bad file is a Spanish message naming entry and field.
        return read_dataset(eval_file).entries, str(eval_file)
    if layout.eval_split.exists():
        return _read_jsonl(layout.eval_split), manifest.relative(layout, layout.eval_split)
    return [], None


def _check_push_first(args) -> dict | None:
    """Token and repo are checked before any heavy work: a missing token must not cost a merge."""
    if not (args.push or args.push_only):
        return None
    if not args.repo_id:
        raise UserError("--push necesita --repo-id usuario/nombre.")
    return check_push_access(args.repo_id, get_token())


def _parts(what: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in what.split(",") if p.strip())


def _gguf_formats(value: str) -> list[str]:
    return [f.strip().lower() for f in (value or "").split(",") if f.strip() and f.strip().lower() != "none"]


def run_contrast(args, layout: OutputLayout, run_manifest: dict, model, tokenizer) -> dict:
    questions = load_questions(run_manifest.get("questions_file") or args.questions)
    gen = run_manifest.get("generation", {})
    # The same settings as the 'before' answers of stage 02, or the comparison would not be fair.
    max_new_tokens = gen.get("max_new_tokens", 200)
    # A run.json written before the setting existed was generated without a penalty: keep it at 1.0.
    repetition_penalty = gen.get("repetition_penalty", 1.0)
    entries, source = _eval_entries(layout, args.eval_file)
    max_len = run_manifest["settings"]["max_seq_length"]
    pairs = probe.load_pairs(run_manifest["probe_file"]) if run_manifest.get("probe_file") else None
    # First everything about the base model: it is the tuned one with its adapter switched off (the same weights
    # 02 used), scored here on exactly the same tokens as the tuned model.
    ppl_before = probe_before = None
    with model.disable_adapter():
        if entries:
            print(f"Perplejidad del modelo base sobre {len(entries)} entradas apartadas ({source}) ...", flush=True)
            ppl_before = perplexity(model, tokenizer, entries, max_seq_length=max_len, batch_size=4)
        if pairs:
            print(f"Sonda de errores del modelo base: {len(pairs)} pares (verdadera frente al error típico) ...",
                  flush=True)
            probe_before = probe.score_pairs(model, tokenizer, pairs)
    with _adapter_merged(model):
        print(f"Respondiendo {len(questions)} preguntas de contraste con el modelo afinado (después) ...", flush=True)
        after = generate_answers(model, tokenizer, questions, max_new_tokens=max_new_tokens,
                                 batch_size=gen.get("batch_size", DEFAULT_BATCH_SIZE),
                                 seed=run_manifest["settings"]["seed"], repetition_penalty=repetition_penalty)
        atomic.write_jsonl(layout.answers_after, after)
        ppl_after = probe_result = None
        if entries:
            print("Perplejidad del modelo afinado ...", flush=True)
            ppl_after = perplexity(model, tokenizer, entries, max_seq_length=max_len, batch_size=4)
        if pairs:
            print("Sonda de errores del modelo afinado ...", flush=True)
            probe_result = probe.summary(probe_before, probe.score_pairs(model, tokenizer, pairs),
                                         Path(run_manifest["probe_file"]).name)
    before = _read_jsonl(layout.answers_before)
    contrast = build_contrast(questions, before, after, ppl_before, ppl_after, probe=probe_result)
    contrast["perplexity_source"] = source
    trained = ((run_manifest.get("stages") or {}).get("train") or {}).get("metrics") or {}
    if trained.get("preference"):
        contrast["preference"] = trained["preference"]
    contrast["generation"] = {"do_sample": False, "max_new_tokens": max_new_tokens,
                              "repetition_penalty": repetition_penalty}
    write_reports(layout, contrast)
    return contrast


@contextmanager
def _adapter_merged(model):
    """On the CPU, the adapter added into the base weights while the tuned model answers and is scored.

    The merged weights are the model that 04 exports (merged_16bit/, GGUF), and the same numbers up to rounding
    as base + adapter computed apart; without the 210 small LoRA products per token the 'after' passes take
    ~15 % less time. Only in fp32: a bf16 base would round the adapter's small changes away (the export itself
    merges in float16), and on a GPU the base is usually 4-bit. There the adapter stays apart.
    """
    import torch

    merge = model_device(model).type == "cpu" and unwrap_peft(model).dtype == torch.float32
    if merge:
        model.merge_adapter()
    try:
        yield
    finally:
        if merge:
            model.unmerge_adapter()


def run(args) -> dict[str, Any]:
    """Stage 04, step by step. --gguf and --what were checked by the parser (afinar.core.validation)."""
    layout, run_manifest = _open_manifest(args.output_dir)  # 1. run.json, with stages 02 and 03 done
    push_access = _check_push_first(args)  # 2. token and repo: a missing token must not cost a merge
    configure_from_manifest(run_manifest)  # 3. contrast, chat, Modelfile and card use 02's system prompt
    if args.push_only:  # (only the upload: step 10)
        return {"layout": layout, "push": _push(args, layout, run_manifest, push_access)}
    record = _refuse_rerun(args, layout, run_manifest)  # 4. an export already done needs --overwrite
    model, tokenizer = _load_tuned(args, layout, run_manifest)  # 5. base + trained adapter
    if args.chat:  # (a conversation instead of the export)
        return _chat(model, tokenizer, run_manifest, args.max_new_tokens, layout)
    with overwrite.set_aside(_previous_outputs(args, layout, record)):  # 6. old export aside, back on failure
        started = time.perf_counter()
        contrast = run_contrast(args, layout, run_manifest, model, tokenizer)  # 7. after answers, verdict
        del model  # 8. the GPU is the export process's now
        free_gpu_memory()
        export_record = _export_record(layout, contrast)
        if not args.no_merge:  # 9. merged_16bit/ and gguf/, checked (after Unsloth, in a process of their own)
            export_record.update(run_export(layout, run_manifest, args.merge_dtype, _gguf_formats(args.gguf)))
        _write_cards(layout, run_manifest, args.repo_id)  # 10. model cards, then run.json
        export_record["seconds"] = round(time.perf_counter() - started, 1)
        manifest.record_stage(layout, run_manifest, "export", **export_record)
    result: dict[str, Any] = {"layout": layout, "contrast": contrast}
    if args.push:  # 11. after the export is recorded: a failed upload must not undo it
        result["push"] = _push(args, layout, run_manifest, push_access)
    return result


def _open_manifest(output_dir: str) -> tuple[OutputLayout, dict]:
    layout = OutputLayout.at(output_dir)
    run_manifest = manifest.read(layout)
    manifest.require_stage(run_manifest, "load", layout)
    manifest.require_stage(run_manifest, "train", layout)
    return layout, run_manifest


def _refuse_rerun(args, layout: OutputLayout, run_manifest: dict) -> dict | None:
    """The previous export's record (None if there is none); refused without --overwrite, except for --chat."""
    record = manifest.finished(run_manifest, "export")
    if record and not args.overwrite and not args.chat:
        raise UserError(
            f"La etapa 04 ya exportó en {layout.root} ({record.get('finished_at')}). Usa --overwrite para repetirla "
            f"o --push-only para volver a subir lo que ya existe."
        )
    return record


def _load_tuned(args, layout: OutputLayout, run_manifest: dict):
    modeling.ensure_base_path(run_manifest)
    if args.eval_file and not args.chat:
        _eval_entries(layout, args.eval_file)  # a bad file is refused now, not after the 'after' answers
    settings = run_manifest["settings"]
    print("Cargando el modelo base con el adaptador entrenado ...", flush=True)
    model, tokenizer = modeling.build(settings, detect_device(), settings.get("precision", "fp32"),
                                      adapter_dir=layout.adapter)
    model.eval()
    return model, tokenizer


def _chat(model, tokenizer, run_manifest: dict, max_new_tokens: int | None, layout: OutputLayout) -> dict:
    penalty = run_manifest.get("generation", {}).get("repetition_penalty", DEFAULT_REPETITION_PENALTY)
    chat(model, tokenizer, max_new_tokens=max_new_tokens or 300, repetition_penalty=penalty)
    return {"layout": layout}


def _previous_outputs(args, layout: OutputLayout, record: dict | None) -> list[Path]:
    """What a repeated export (--overwrite) replaces: moved aside, and deleted only once this one is recorded.

    Merged and GGUF files are only replaced when this run makes new ones (not with --no-merge / --gguf none).
    """
    if not record:
        return []
    previous = [layout.answers_after, layout.contrast_json, layout.contrast_md, layout.contrast_html]
    if not args.no_merge:
        previous += [layout.merged] + ([layout.gguf_dir] if _gguf_formats(args.gguf) else [])
    return previous


def _export_record(layout: OutputLayout, contrast: dict) -> dict[str, Any]:
    return {
        "contrast": manifest.relative(layout, layout.contrast_json),
        "report_md": manifest.relative(layout, layout.contrast_md),
        "report_html": manifest.relative(layout, layout.contrast_html),
        "verdict": contrast["verdict"],
        "perplexity": contrast["perplexity"],
    }


def _write_cards(layout: OutputLayout, run_manifest: dict, repo_id: str | None) -> None:
    contrast_md = layout.contrast_md.read_text(encoding="utf-8") if layout.contrast_md.exists() else None
    for folder, kind in ((layout.adapter, "adapter"), (layout.merged, "merged"), (layout.gguf_dir, "gguf")):
        if folder.exists():
            write_model_card(folder, kind=kind, manifest=run_manifest, contrast_md=contrast_md, repo_id=repo_id)


def _push(args, layout: OutputLayout, run_manifest: dict, access: dict | None) -> dict:
    parts = _parts(args.what)
    print(f"Subiendo {', '.join(parts)} a {args.repo_id} ...", flush=True)
    result = push(layout, args.repo_id, get_token(), private=args.private, what=parts)
    run_manifest = manifest.read(layout)
    run_manifest.setdefault("pushes", []).append({"at": manifest.now_iso(), "access": access, **result})
    manifest.write(layout, run_manifest)
    return result
