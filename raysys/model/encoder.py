"""BiEncoder: one shared Hugging Face encoder for queries and passages.

Pooling (mean or CLS), L2 normalisation and the E5-style `query: ` / `passage: ` prefixes are
configurable. `save()` writes a directory that `transformers.AutoModel` and
`sentence_transformers.SentenceTransformer` both load directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer

from raysys.errors import ConfigError


@dataclass
class EncoderSettings:
    pooling: str = "mean"
    normalize: bool = True
    query_prefix: str = "query: "
    passage_prefix: str = "passage: "
    max_query_length: int = 64
    max_passage_length: int = 128


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def tokenize_texts(tokenizer, settings: EncoderSettings, texts: list[str], kind: str) -> dict[str, torch.Tensor]:
    """What `BiEncoder.tokenize` does, with any tokenizer: a thread that tokenizes ahead of the
    training step uses its own copy (a fast tokenizer is not safe to share between threads)."""
    prefix, max_len = ((settings.query_prefix, settings.max_query_length) if kind == "query"
                       else (settings.passage_prefix, settings.max_passage_length))
    batch = tokenizer([prefix + t for t in texts], padding=True, truncation=True, max_length=max_len,
                      return_tensors="pt")
    return dict(batch)


class BiEncoder(nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer, settings: EncoderSettings):
        super().__init__()
        self.backbone, self.tokenizer, self.settings = backbone, tokenizer, settings

    @classmethod
    def from_pretrained(cls, name_or_path: str, settings: EncoderSettings | None = None,
                        torch_dtype: torch.dtype | None = None) -> "BiEncoder":
        from raysys.model.default import resolve_model_path

        path = resolve_model_path(name_or_path)
        tokenizer = check_model(path)
        try:
            backbone = (AutoModel.from_pretrained(path, dtype=torch_dtype) if torch_dtype
                        else AutoModel.from_pretrained(path))
        except (OSError, ValueError, RuntimeError) as exc:  # missing/corrupt weights, shape mismatch
            raise ConfigError(f"cannot load the model weights: {_first_line(exc)}", file=str(path),
                              field=MODEL_FIELD, hint="give a complete model directory: config.json plus "
                              "model.safetensors or pytorch_model.bin, e.g. a training run's hf_model/") from None
        return cls(backbone, tokenizer, settings or _settings_from_dir(path))

    def tokenize(self, texts: list[str], kind: str, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Prefixed, truncated, padded tensors; on `device` when given (a DeepSpeed engine does
        not move its inputs, so GPU training passes `engine.device`)."""
        batch = tokenize_texts(self.tokenizer, self.settings, texts, kind)
        return {k: v.to(device) for k, v in batch.items()} if device is not None else batch

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """fp32 embeddings whatever the backbone's precision: pooling and normalisation of bf16
        hidden states would round every similarity that the loss divides by the temperature."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        emb = pool(hidden, attention_mask, self.settings.pooling)
        return F.normalize(emb, p=2, dim=-1) if self.settings.normalize else emb

    def encode_texts(self, texts: list[str], kind: str) -> torch.Tensor:
        batch = self.tokenize(texts, kind, device=next(self.parameters()).device)
        return self(batch["input_ids"], batch["attention_mask"])

    def save(self, out_dir: str | os.PathLike, state_dict: dict | None = None) -> Path:
        """Write an HF + sentence-transformers directory atomically (temp dir, then rename)."""
        return save_encoder_dir(self.backbone, self.tokenizer, self.settings, Path(out_dir), state_dict)


MODEL_FIELD = "model.name_or_path"
# A tokenizer's vocabulary lives in one of these (or a *.model SentencePiece file).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name"


def _looks_like_path(name: str) -> bool:
    """Absolute, ./relative, ~ or deeper than org/name: meant as a local path, not a hub id."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or not _HUB_ID.match(name)


def check_model(name_or_path: str):
    """Pre-flight for a model path or hub id: its config and tokenizer load, and the tokenizer
    fits the model's embedding table. Cheap (no weights are read); returns the tokenizer.
    Every failure is a one-line ConfigError naming the path, the field and what to do."""
    from transformers import AutoConfig

    path = str(name_or_path)
    if _looks_like_path(path) and not Path(path).expanduser().exists():
        raise ConfigError("model path does not exist", file=path, field=MODEL_FIELD,
                          hint="give a local model directory, a Hugging Face hub id, or 'default' for the "
                               "embedded multilingual-e5-small")
    if Path(path).is_file():
        raise ConfigError("model path is a file, not a directory", file=path, field=MODEL_FIELD,
                          hint="give the directory that holds config.json and the weights")
    try:
        model_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        where = ("a local directory without a usable config.json" if Path(path).is_dir() else
                 "not a local directory, and not loadable as a Hugging Face hub id (offline, or no such model)")
        raise ConfigError(f"cannot load the model: {where}: {_first_line(exc)}", file=path, field=MODEL_FIELD,
                          hint="give a model directory saved with save_pretrained, or 'default'") from None
    local = Path(path).expanduser()
    if local.is_dir() and not any((local / f).exists() for f in TOKENIZER_FILES) and not any(local.glob("*.model")):
        # transformers would silently build an empty tokenizer that maps every word to [UNK]
        raise ConfigError(f"no tokenizer files in the model directory (looked for {', '.join(TOKENIZER_FILES)})",
                          file=path, field=MODEL_FIELD,
                          hint="save the model's tokenizer into the same directory with tokenizer.save_pretrained")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load the tokenizer: {_first_line(exc)}", file=path, field=MODEL_FIELD,
                          hint="save the model's tokenizer into the same directory with "
                               "tokenizer.save_pretrained") from None
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(f"tokenizer/model mismatch: the tokenizer has {len(tokenizer)} tokens but the model's "
                          f"embedding table has {vocab}", file=path, field=MODEL_FIELD,
                          hint="use the tokenizer that was saved with this model")
    return tokenizer


def save_encoder_dir(backbone, tokenizer, settings: EncoderSettings, out_dir: Path,
                     state_dict: dict | None = None) -> Path:
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    dim = backbone.config.hidden_size
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if settings.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (tmp / "2_Normalize").mkdir(exist_ok=True)
    (tmp / "1_Pooling").mkdir(exist_ok=True)
    _write_json(tmp / "modules.json", modules)
    _write_json(tmp / "1_Pooling" / "config.json", {
        "word_embedding_dimension": dim, "pooling_mode_cls_token": settings.pooling == "cls",
        "pooling_mode_mean_tokens": settings.pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False})
    _write_json(tmp / "sentence_bert_config.json", {"max_seq_length": settings.max_passage_length,
                                                     "do_lower_case": False})
    _write_json(tmp / "config_sentence_transformers.json", {
        "prompts": {"query": settings.query_prefix, "passage": settings.passage_prefix},
        "default_prompt_name": None, "similarity_fn_name": "cosine"})
    _write_json(tmp / "raysys_encoder.json", settings.__dict__)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _settings_from_dir(path: str) -> EncoderSettings:
    """Recover pooling/prefixes saved by raysys or sentence-transformers; defaults otherwise."""
    p = Path(path)
    if (p / "raysys_encoder.json").exists():
        return EncoderSettings(**json.loads((p / "raysys_encoder.json").read_text()))
    settings = EncoderSettings()
    pooling_cfg = p / "1_Pooling" / "config.json"
    if pooling_cfg.exists() and json.loads(pooling_cfg.read_text()).get("pooling_mode_cls_token"):
        settings.pooling = "cls"
    return settings


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")
