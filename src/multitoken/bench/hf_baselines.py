"""`bench decode --baselines`: Hugging Face transformers decoding the same weights.

The checkpoint's trunk + head 1 are exported with `interop.export_hf` (a Hugging Face directory
of the family whose layers are the model's, e.g. LlamaForCausalLM) and loaded back with
`AutoModelForCausalLM` in the model's dtype, on its device: transformers then runs the network
our plain decoding runs, with its own modelling code. Two baselines a user would reach for:

- `greedy`: `generate(do_sample=False)`, batched as the bench is (its prompts all have the same
  length, so there is no padding and no attention mask to get wrong);
- `prompt_lookup`: prompt-lookup decoding (`generate(prompt_lookup_num_tokens=k)`): drafts are
  copied from where the last n-gram occurred earlier in the sequence and verified by the model
  in one forward. transformers' assisted generation refuses batches of more than one sequence,
  so it decodes one prompt at a time.

Both are greedy only. The export's generation config stops at eos; the bench decodes a fixed
number of tokens in every mode, so eos is cleared here (nothing is suppressed: `min_new_tokens`
would forbid eos and so change the output).

Tokens per forward = new tokens / (model forwards x sequences in each), counted by a forward
hook on the model, prefill included: transformers' prefill emits the first token (and, with
prompt lookup, verifies the first drafts too), so plain greedy is exactly 1.0.

`transformers` is optional (the `hf` extra): without it `transformers` is None here and
`require_transformers` raises the one-line error. It is imported at the top of this module
because the baselines need it and nothing else does; `import transformers` itself is lazy
(about 0.7 s; modelling code loads when first used).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multitoken.errors import CheckpointError, MultitokenError
from multitoken.interop import export_hf
from multitoken.model import MultiTokenModel
from multitoken.tokenizer import Tokenizer

try:
    import transformers
except ImportError:  # the optional `hf` extra is not installed
    transformers = None


@dataclass
class Decoded:
    """One batch decoded by one mode: what the bench accumulates, for ours and theirs alike."""

    tokens: list[list[int]]  # new tokens per sequence
    seconds: float  # wall time of the whole call, prefill included
    forwards: int  # model calls
    rows: int  # (sequence, call) pairs the tokens-per-forward ratio divides by
    appended: float  # tokens those calls appended (tokens per forward = appended / rows)
    # speculation, per draft depth: drafts verified and accepted (empty for the others)
    attempts: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)


def require_transformers() -> None:
    """Raise the one-line error when the optional dependency is missing."""
    if transformers is None:
        raise MultitokenError("--baselines needs the `transformers` package: pip install "
                              "'multitoken[hf]'")


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers' info/warning logs and progress bars off, restored afterwards (the bench's
    own output is a table and a last JSON line)."""
    log = transformers.utils.logging
    verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()


class HFBaselines:
    """The exported model loaded with transformers, and the two baseline decoders.

    The export lives in a temporary directory for the object's lifetime (the loaded weights may
    map its file); `close()` removes it, as does garbage collection or the interpreter's exit.
    """

    def __init__(self, model: MultiTokenModel, tokenizer: Tokenizer) -> None:
        require_transformers()
        self._dir = tempfile.TemporaryDirectory(prefix="multitoken-hf-baseline-")
        directory = Path(self._dir.name)
        try:
            export_hf(model, directory, tokenizer)
        except CheckpointError as e:  # e.g. linear heads: head 1 is no transformer layer
            raise MultitokenError(f"--baselines exports trunk + head 1 as a Hugging Face "
                                  f"model, and cannot: {e}") from None
        weight = model.tok_embeddings.weight
        with _quiet():
            hf = transformers.AutoModelForCausalLM.from_pretrained(directory,
                                                                   local_files_only=True)
        self.model: nn.Module = hf.to(device=weight.device, dtype=weight.dtype).eval()
        self.model.generation_config.eos_token_id = None  # fixed length, as in every mode
        self.device = weight.device
        self.version = str(transformers.__version__)
        self.architecture = type(hf).__name__  # e.g. LlamaForCausalLM
        self._calls = self._rows = 0
        self.model.register_forward_hook(self._count)

    def close(self) -> None:
        self._dir.cleanup()

    def _count(self, module: nn.Module, args: Any, output: Any) -> None:
        self._calls += 1
        self._rows += int(output.logits.shape[0])

    def _generate(self, prompts: list[list[int]], new_tokens: int, **kw: Any) -> Decoded:
        idx = torch.tensor(prompts, device=self.device)  # [B, T]: equal lengths, no padding
        self._calls = self._rows = 0
        with _quiet(), torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(idx, attention_mask=torch.ones_like(idx),
                                      max_new_tokens=new_tokens, do_sample=False, **kw)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
        tokens = out[:, idx.shape[1]:].tolist()
        return Decoded(tokens, seconds, self._calls, self._rows,
                       float(sum(len(t) for t in tokens)))

    def greedy(self, prompts: list[list[int]], new_tokens: int) -> Decoded:
        """transformers' greedy `generate` over the whole batch."""
        return self._generate(prompts, new_tokens)

    def prompt_lookup(self, prompts: list[list[int]], new_tokens: int,
                      num_tokens: int) -> Decoded:
        """Prompt-lookup decoding, one prompt at a time (transformers refuses batches)."""
        parts = [self._generate([p], new_tokens, prompt_lookup_num_tokens=num_tokens)
                 for p in prompts]
        return Decoded([t for d in parts for t in d.tokens], sum(d.seconds for d in parts),
                       sum(d.forwards for d in parts), sum(d.rows for d in parts),
                       sum(d.appended for d in parts))
