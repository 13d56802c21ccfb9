"""Defaults per device and the rules that derive one setting from another."""

import importlib.util

import pytest

from afinar.core import settings
from afinar.export.modelfile import REPEAT_PENALTY
from conftest import ROOT, run_script


def _parse_02(argv):
    spec = importlib.util.spec_from_file_location("script_02", ROOT / "02_load_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args(argv)


def test_lora_alpha_keeps_the_default_ratio_for_any_rank():
    for kind in ("cpu", "cuda"):
        ratio = settings.default("lora_alpha", kind) / settings.default("lora_r", kind)
        for rank in (8, 16, 32, 64):
            assert settings.lora_alpha_for(rank, kind) == round(rank * ratio)
        assert settings.lora_alpha_for(settings.default("lora_r", kind), kind) == settings.default("lora_alpha", kind)


def test_02_rank_flag_default_matches_the_documented_default():
    # 02 declares --lora-r with a literal default; the help text quotes settings.DEFAULTS, so they must agree.
    args = _parse_02([])
    assert args.lora_r == settings.default("lora_r", "cpu") == settings.default("lora_r", "cuda")
    assert args.lora_alpha is None, "without --lora-alpha, stage 02 derives it with settings.lora_alpha_for"


def test_modelfile_writes_the_penalty_it_is_given():
    # That it is given the one the contrast test used (run.json) is checked end to end in test_pipeline_e2e.
    from afinar.export.modelfile import modelfile_text

    chosen = modelfile_text("./m.gguf", "chatml", system_prompt="Responde.", repetition_penalty=1.3)
    assert "PARAMETER repeat_penalty 1.3\n" in chosen and f"repeat_penalty {REPEAT_PENALTY:g}" not in chosen


def test_repetition_penalty_flag_is_checked_before_anything_is_written(tmp_path):
    from conftest import run_script

    target = tmp_path / "salida"
    proc = run_script("02_load_model.py", "--repetition-penalty", "0", "--output-dir", str(target), check=False)
    assert proc.returncode == 2
    assert "--repetition-penalty" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert not target.exists()
    assert _parse_02(["--repetition-penalty", "1.0"]).repetition_penalty == 1.0


@pytest.mark.parametrize("script", ["02_load_model.py", "03_train_model.py", "04_inference_and_export.py"])
def test_every_script_explains_its_options_with_their_defaults(script):
    # argparse formats help texts with %: a reason quoting "1 %" once made 03 --help crash.
    result = run_script(script, "--help", check=False, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stdout.count("por defecto") >= 5
