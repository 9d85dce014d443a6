"""The scripts in examples/ run as documented and show what they claim."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_trainer_gpt2_attributes_queries_to_their_topic(tmp_path, capsys):
    """A real Trainer run (AdamW, clipping, checkpoints) read by from_hf_trainer: a query's 10 strongest proponents
    are documents of its topic far above chance (1/6)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    summary = _load("hf_trainer_gpt2").main(["--out-dir", str(tmp_path / "run"), "--quiet"])
    assert summary["checkpoints"] == 6 and summary["output_dir"] == str(tmp_path / "run")
    assert summary["precision_at_10"] >= 0.8 > 2 * summary["chance"]
    assert "same-topic share" in capsys.readouterr().out
