"""Merge and GGUF export, in a process of their own where Unsloth has been imported.

Unsloth patches transformers' Llama classes globally when it is imported; a merge in the same process
would run the fp32 reference model through those patches (and their CUDA-only rope caches). A fresh
process also hands back every byte the tuned model held before the 16-bit copy is built. Without Unsloth
(the CPU path) there is nothing to escape, and the new process would cost its imports again (~4 s of 04's
~100 s on 2 cores): run_export does the same work in the caller's process there.

    python -m afinar.export.export_worker --output-dir salida --merge-dtype float16 --gguf q8_0 --result FILE
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from afinar.core import atomic, manifest, settings
from afinar.core.errors import main_guard, UserError
from afinar.core.layout import OutputLayout
from afinar.core.prompts import configure_from_manifest
from afinar.export.gguf_export import TYPE_DESCRIPTIONS, export_gguf
from afinar.export.merge import merge_adapter
from afinar.export.modelfile import write_modelfile


def export(layout: OutputLayout, base_path: str, merge_dtype: str, formats: list[str],
           repetition_penalty: float | None = None) -> dict:
    from transformers import AutoTokenizer  # delayed: seconds of import, paid only in the worker process

    print("Fusionando el adaptador con los pesos originales en 16 bits ...", flush=True)
    merge = merge_adapter(base_path, layout.adapter, layout.merged, dtype=merge_dtype)
    record = {"merge": {**merge, "path": manifest.relative(layout, layout.merged),
                        "adapter_path": manifest.relative(layout, layout.adapter)}}
    if formats:
        print(f"Exportando GGUF ({', '.join(formats)}) ...", flush=True)
        files = export_gguf(layout.merged, layout.gguf_dir, tuple(formats))
        preferred = next((f for f in files if f["type"] == "q8_0"), files[0])
        tokenizer = AutoTokenizer.from_pretrained(layout.merged)
        write_modelfile(Path(preferred["path"]), layout.gguf_dir / "Modelfile", tokenizer,
                        gguf_type=TYPE_DESCRIPTIONS.get(preferred["type"]), repetition_penalty=repetition_penalty)
        record["gguf"] = [{**f, "path": manifest.relative(layout, Path(f["path"]))} for f in files]
    return record


def run_export(layout: OutputLayout, run_manifest: dict, merge_dtype: str, formats: list[str]) -> dict:
    """04's merge and GGUF export: in a new process after Unsloth, here otherwise. The same record either way."""
    base_path = run_manifest["settings"]["base_path"]
    if "unsloth" in sys.modules:
        return run_in_subprocess(layout, base_path, merge_dtype, formats)
    return export(layout, base_path, merge_dtype, formats, repetition_penalty=_penalty(run_manifest))


def _penalty(run_manifest: dict) -> float | None:
    # Ollama answers with the penalty the contrast test generated with (02 --repetition-penalty).
    return (run_manifest.get("generation") or {}).get("repetition_penalty")


def run_in_subprocess(layout: OutputLayout, base_path: str, merge_dtype: str, formats: list[str]) -> dict:
    result_file = layout.root / ".export_result.json"
    result_file.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "afinar.export.export_worker",
                           "--output-dir", str(layout.root), "--base-path", base_path, "--merge-dtype", merge_dtype,
                           "--gguf", ",".join(formats) or "none",
                           "--result", str(result_file)], cwd=Path(__file__).resolve().parents[2])
    if proc.returncode == 2:
        raise UserError("La exportación se detuvo (el mensaje está arriba); los archivos anteriores siguen intactos.")
    if proc.returncode != 0 or not result_file.exists():
        raise RuntimeError(f"La exportación falló (código {proc.returncode}); mira el error de arriba.")
    record = json.loads(result_file.read_text(encoding="utf-8"))
    result_file.unlink()
    return record


@main_guard
def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--output-dir", required=True)
    p.add_argument("--base-path", required=True)
    p.add_argument("--merge-dtype", default=settings.common_default("merge_dtype"))
    p.add_argument("--gguf", default="none")
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)
    formats = [f.strip() for f in args.gguf.split(",") if f.strip() and f.strip() != "none"]
    layout = OutputLayout.at(args.output_dir)
    run_manifest = manifest.read(layout)
    configure_from_manifest(run_manifest)  # the Modelfile's SYSTEM line is the run's system prompt
    record = export(layout, args.base_path, args.merge_dtype, formats, repetition_penalty=_penalty(run_manifest))
    atomic.write_json(args.result, record)


if __name__ == "__main__":
    main()
