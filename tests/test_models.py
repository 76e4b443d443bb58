"""The local model builder: shape, tokenizer round trip, caching, size checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from kvtier_bench import models


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("models")
    return Path(models.build_model("tiny", str(cache)))


def test_tiny_has_the_files_vllm_loads(tiny_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", models.MARKER_FILE):
        assert (tiny_dir / name).is_file(), name
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 4
    assert config["hidden_size"] == 256
    assert config["head_dim"] == 64
    assert config["max_position_embeddings"] >= 8192
    assert config["dtype"] == "bfloat16"


def test_tiny_parameter_count_is_about_five_million(tiny_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    count = sum(p.numel() for p in model.parameters())
    assert count == models.SIZES["tiny"].approx_params()
    assert 4_000_000 < count < 7_000_000
    assert next(model.parameters()).dtype == torch.bfloat16


def test_every_size_is_in_its_advertised_range() -> None:
    # Computed from the spec, so no large model is built here.
    expected = {"tiny": (4e6, 7e6), "small": (20e6, 32e6), "base": (85e6, 120e6)}
    for size, (low, high) in expected.items():
        assert low < models.SIZES[size].approx_params() < high, size


def test_tokenizer_round_trips_text_and_has_special_tokens(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    assert len(tokenizer) == models.SIZES["tiny"].vocab_size
    text = "The KV cache spills 128 blocks to disk; naïve café 東京 ✓\n  def f(x): return x"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Common words were learned as single tokens, so English compresses well.
    assert len(tokenizer("the water and the mountain").input_ids) <= 7
    assert tokenizer.eos_token == models.EOS_TOKEN


def test_chat_template_renders_roles_and_generation_prompt(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_second_call_hits_the_cache(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tiny_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def fail(*args: object) -> None:
        raise AssertionError("the cached model was rebuilt")

    monkeypatch.setattr(models, "_build_into", fail)
    again = models.build_model("tiny", str(tiny_dir.parent))
    assert Path(again) == tiny_dir
    assert weights.stat().st_mtime_ns == before
    # No staging folders are left behind.
    assert [p.name for p in tiny_dir.parent.iterdir()] == [tiny_dir.name]


def test_builds_are_deterministic_and_leave_torch_rng_alone(tiny_dir: Path, tmp_path: Path) -> None:
    import torch

    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    other = Path(models.build_model("tiny", str(tmp_path)))
    assert torch.equal(torch.rand(3), expected)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (other / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_losing_the_rename_race_uses_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate another process finishing first: its model appears while ours builds.
    final = tmp_path / models.model_dir_name("tiny")

    def build_while_another_wins(target: Path, size: str, spec: models.ModelSpec) -> None:
        final.mkdir()
        (final / models.MARKER_FILE).write_text("{}")
        (target / "partial").write_text("ours")

    monkeypatch.setattr(models, "_build_into", build_while_another_wins)
    assert models.build_model("tiny", str(tmp_path)) == str(final)
    assert not (final / "partial").exists()
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_default_cache_dir_follows_kvtier_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVTIER_HOME", str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("KVTIER_HOME")
    assert models.default_cache_dir() == Path.home() / ".cache" / "kvtier" / "models"


def test_unknown_size_names_the_choices() -> None:
    with pytest.raises(ValueError, match="base, small, tiny"):
        models.build_model("huge")


def test_cli_prints_the_directory(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models.main(["--size", "tiny", "--cache-dir", str(tiny_dir.parent)]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_dir)
