"""Loading a model directory's tokenizer without torch.

transformers' `AutoTokenizer` imports torch whenever it is installed (its config classes pull in
the RoPE utilities, which import it), which costs the router a second and a few hundred MB for
nothing. `PreTrainedTokenizerFast` loads `tokenizer.json` as written, with
`tokenizer_config.json`'s special tokens and the chat template, and imports no torch. The engine
and the router both load with `load_tokenizer`, so they always tokenize alike.

One difference from `AutoTokenizer`: for some model types (Qwen2 among them) transformers 5
swaps in a model-specific class that rebuilds the pre-tokenizer and normalizer from its own
defaults instead of reading them from tokenizer.json. Here tokenizer.json is the tokenizer, as
in Rust front ends built on the `tokenizers` crate.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerFast:
    """Load the fast tokenizer (and its chat template) of a local model directory.

    Raises ValueError naming the directory when it is missing, has no tokenizer file, or holds
    one that does not load.
    """
    from transformers import PreTrainedTokenizerFast  # about 0.6 s: only when loading

    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"tokenizer: directory {path} does not exist")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"tokenizer: {path} has no {' or '.join(TOKENIZER_FILES)}")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"tokenizer: cannot load the tokenizer in {path}: {e}") from e
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f"tokenizer: {path} has no fast tokenizer (tokenizer.json)")
    return tokenizer
