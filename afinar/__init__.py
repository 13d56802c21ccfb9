"""afinar: afinado LoRA de un modelo pequeño para un asistente académico en español.

Map of the package (one line per group; each module's docstring says the rest):

    core/      what every stage shares
               settings (defaults, inheritance) · validation (ranges) · cli (parser pieces) · manifest (run.json)
               layout (paths in the output dir) · atomic (writes) · errors · prompts (the one chat format)
               environment (device, precision) · embedded (SmolLM2) · overwrite · checkpoints · distributed
               doctor · models (unwrap PEFT, device, free GPU memory) · redaction (secrets out of messages)
    data/      the training data
               pipeline (what stage 03 calls) · data_check (read, validate) · data_clean (duplicates, language)
               data_mix (order, held-out split) · data_measure (token lengths, report) · hub_datasets
               distill + teacher (00_destilar.py: a teacher model writes entries)
    train/     the model and its training
               modeling (load base + LoRA) · engine (which engine, which batch) · training (SFT) · preference (DPO)
               packing · fp8 · frozen_prefix
    evaluate/  answering and judging
               decoding (greedy loop) · generation (contrast answers, chat) · contrast (metrics, verdict) · facts
               language (Spanish or not) · keywords · probe + logprobs (misconception probe) · perplexity
               questions · report (informe.md/.html)
    export/    what leaves the output dir
               merge (16 bits) · gguf_export + kquants (writer) · gguf_check (read back, compare) · verify (logit
               check, disk space) · modelfile (Ollama) · model_card · hub (push) · export_worker
    stages/    the scripts' bodies: stage_load (02) · stage_train (03) · stage_export (04) · distill_cli (00)
               colab + tryout (the notebook's helpers)
"""

__version__ = "0.1.0"
