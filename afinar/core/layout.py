"""The one place that knows where each artifact lives inside the output directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_OUTPUT_DIR = "salida"


@dataclass(frozen=True)
class OutputLayout:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> "OutputLayout":
        return cls(Path(root))

    @property
    def manifest(self) -> Path:
        return self.root / "run.json"

    # stage 02
    @property
    def initial_adapter(self) -> Path:
        return self.root / "adapter_inicial"

    # stage 03
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def data_dir(self) -> Path:
        return self.root / "datos"

    @property
    def data_report(self) -> Path:
        return self.data_dir / "informe.md"

    @property
    def data_histogram(self) -> Path:
        return self.data_dir / "longitudes.png"

    @property
    def eval_split(self) -> Path:
        """Held-out entries that training never sees; 02 and 04 score perplexity on them."""
        return self.data_dir / "evaluacion.jsonl"

    # contrast test (02 writes "antes", 04 writes "despues" and the report)
    @property
    def contrast_dir(self) -> Path:
        return self.root / "contraste"

    @property
    def answers_before(self) -> Path:
        return self.contrast_dir / "antes.jsonl"

    @property
    def answers_after(self) -> Path:
        return self.contrast_dir / "despues.jsonl"

    @property
    def contrast_json(self) -> Path:
        return self.contrast_dir / "contraste.json"

    @property
    def contrast_md(self) -> Path:
        return self.contrast_dir / "informe.md"

    @property
    def contrast_html(self) -> Path:
        return self.contrast_dir / "informe.html"

    # stage 04 exports
    @property
    def merged(self) -> Path:
        return self.root / "merged_16bit"

    @property
    def gguf_dir(self) -> Path:
        return self.root / "gguf"
